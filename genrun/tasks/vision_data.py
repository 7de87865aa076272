"""torchvision data set classes that check the files are present instead of their md5 sums, and
read CIFAR's pickles without running code.

torchvision verifies md5 sums when it downloads (unchanged here: the archives' sums are kept).
At load time its CIFAR, SVHN and Places365 classes hash every file again; these subclasses
only check presence, so a re-packed copy, a subset, or the tests' fixtures written in the
published format load too.

CIFAR's batches are Python pickles, and torchvision reads them with `pickle.load`, which calls any
function a file names: a planted batch file runs its code. `read_pickle` unpickles with an
allow-list (dicts, lists, strings, numbers, numpy arrays, all a batch holds) and refuses any other
name; a damaged file is a one-line `DataCorrupt` naming it. SVHN's .mat files go through scipy's
`loadmat` (data only, no code), the devkit lists and the image files through torchvision's readers.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from torchvision import datasets
from torchvision.datasets.vision import VisionDataset

from genrun.errors import DataCorrupt

#: What a CIFAR pickle may name: numpy's array and dtype rebuilders (numpy 1 and 2 spell the module
#: differently; protocol 5 rebuilds from a buffer) and the bytes helper of protocol-2 pickles.
SAFE_NAMES = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_NAMES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no data file needs; refused, not run")


def read_pickle(path: Path) -> Any:
    """The object a data pickle holds, built from plain data only; DataCorrupt naming `path` else."""
    with open(path, "rb") as f:
        try:
            return _DataOnly(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, MemoryError) as err:
            raise DataCorrupt(f"task.data_dir: {path} is not a readable data pickle "
                              f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); "
                              "extract the data set's archive again") from None


def read_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    """One CIFAR batch: uint8 images, N x 3072 (channel-major 32 x 32), and N labels."""
    entry = read_pickle(path)
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get(label_key) if isinstance(entry, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(y, (int, np.integer)) for y in labels)):
        raise DataCorrupt(f"task.data_dir: {path} is not a CIFAR batch (a dict of uint8 'data', N x 3072, and "
                          f"N int '{label_key}'); extract the data set's archive again")
    return data, [int(y) for y in labels]


def _no_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]  # check_integrity(path, None): the file exists


class CIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 (its download, `__getitem__`, `data`, `targets`), read by `read_batch`."""

    train_list = _no_md5(datasets.CIFAR10.train_list)
    test_list = _no_md5(datasets.CIFAR10.test_list)
    meta = {**datasets.CIFAR10.meta, "md5": None}
    label_key = "labels"

    def __init__(self, root: str | os.PathLike, train: bool = True, transform: Any = None,
                 target_transform: Any = None, download: bool = False) -> None:
        VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        folder = Path(self.root) / self.base_folder
        names = [name for name, _ in (self.train_list if train else self.test_list)]
        batches = [read_batch(folder / name, self.label_key) for name in names]
        self.data = np.vstack([data for data, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self.targets = [label for _, labels in batches for label in labels]
        self._load_meta()

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        meta = read_pickle(path)
        if not isinstance(meta, dict) or not isinstance(meta.get(self.meta["key"]), list):
            raise DataCorrupt(f"task.data_dir: {path} holds no '{self.meta['key']}' list; extract the archive again")
        self.classes = meta[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR100(CIFAR10):
    base_folder = datasets.CIFAR100.base_folder
    url, filename, tgz_md5 = datasets.CIFAR100.url, datasets.CIFAR100.filename, datasets.CIFAR100.tgz_md5
    train_list = _no_md5(datasets.CIFAR100.train_list)
    test_list = _no_md5(datasets.CIFAR100.test_list)
    meta = {**datasets.CIFAR100.meta, "md5": None}
    label_key = "fine_labels"


class SVHN(datasets.SVHN):
    def __init__(self, root: str | os.PathLike, split: str = "train", **kwargs: Any) -> None:
        try:
            super().__init__(root, split, **kwargs)
        except (OSError, RuntimeError):  # missing, or a failed download: the task words these
            raise
        except Exception as err:  # noqa: BLE001 - scipy's readers raise many kinds on a damaged file
            path = Path(root) / self.split_list[split][1]
            reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise DataCorrupt(f"task.data_dir: {path} is not a readable SVHN .mat file ({reason}); "
                              "download it again") from None

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


class Places365(datasets.Places365):
    def _check_integrity(self, file: str, md5: str, download: bool) -> bool:
        if os.path.isfile(file):
            return True
        if not download:
            raise RuntimeError(f"{file} is missing; task.download=true fetches it")
        return False
