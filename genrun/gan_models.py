"""DCGAN (Radford et al. 2016, as in PyTorch's DCGAN tutorial): a generator and a discriminator in
one module, so checkpoints, DDP and evaluation handle one model.

Layout: the generator maps noise z (nz x 1 x 1) to 4x4 with a transposed convolution, then doubles
the side with stride-2 transposed convolutions (BatchNorm + ReLU between, Tanh out) up to
`image_size`; the discriminator mirrors it (stride-2 convolutions, BatchNorm from the second on,
LeakyReLU 0.2) down to 4x4, then one 4x4 convolution to a logit. 64 px has the tutorial's layers
(widths 8, 4, 2, 1 x ngf); 32 px one doubling fewer. The discriminator returns logits, not
probabilities: the task's BCE-with-logits is the tutorial's Sigmoid + BCE without its overflow.
Weights start as the DCGAN paper says: N(0, 0.02); BatchNorm weights N(1, 0.02), biases 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genrun.errors import UserError


def _doublings(image_size: int) -> int:
    """How many times the side doubles from 4 to `image_size` (a power of two, 16 or more)."""
    n = int(round(math.log2(image_size))) - 2 if isinstance(image_size, int) and image_size > 0 else -1
    if n < 2 or 4 * 2 ** n != image_size:
        raise UserError(f"model: DCGAN needs task.image_size to be a power of two >= 16, got {image_size}")
    return n


def _generator(nz: int, ngf: int, channels: int, n: int) -> nn.Sequential:
    widths = [ngf * 2 ** i for i in reversed(range(n))]  # e.g. 8, 4, 2, 1 x ngf for 64 px
    layers: list[nn.Module] = [nn.ConvTranspose2d(nz, widths[0], 4, 1, 0, bias=False), nn.BatchNorm2d(widths[0]),
                               nn.ReLU(True)]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
    return nn.Sequential(*layers, nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh())


def _discriminator(ndf: int, channels: int, n: int) -> nn.Sequential:
    widths = [ndf * 2 ** i for i in range(n)]  # 1, 2, 4, 8 x ndf for 64 px
    layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False), nn.Flatten(0))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class DCGAN(nn.Module):
    """`generator` (z -> image in [-1, 1]) and `discriminator` (image -> logit), trained as two players.

    `forward(noise, real=None, generator_grad=True)` -> (D's logits on `real` or None, D's logits on
    G(noise)): every training forward goes through it, so DDP sees (and all-reduces) both players.
    `generator_grad=False` makes the fakes without a graph (the discriminator's turn: G is fixed).
    """

    def __init__(self, image_size: int = 32, channels: int = 1, nz: int = 100, ngf: int = 64,
                 ndf: int = 64) -> None:
        super().__init__()
        n = _doublings(image_size)
        self.nz, self.image_size, self.channels = nz, image_size, channels
        self.generator = _generator(nz, ngf, channels, n)
        self.discriminator = _discriminator(ndf, channels, n)
        self.apply(_init)

    def forward(self, noise: torch.Tensor, real: torch.Tensor | None = None,
                generator_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and generator_grad):
            fake = self.generator(noise)
        # real and fake in separate forwards, as the tutorial does: each its own BatchNorm statistics
        real_logits = self.discriminator(real) if real is not None else None
        return real_logits, self.discriminator(fake)
