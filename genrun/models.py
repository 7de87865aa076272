"""Small models for the offline tasks. Larger ones come from torchvision and timm."""

from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    """conv(32)-conv(64)-maxpool-fc(128)-fc(classes), ReLU; any input side >= 2.

    The adaptive pool to 4x4 lets the same network take 8x8 digits and 28x28 MNIST.
    `batchnorm` adds BatchNorm after each conv; `dropout` applies before the last layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        hidden: int = 128,
        batchnorm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            norm = [nn.BatchNorm2d(c_out)] if batchnorm else []
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *norm, nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, width),
            *conv(width, 2 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))

