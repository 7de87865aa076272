"""The Table 2 data sets load from tiny fixtures written in each one's published on-disk format.

Every fixture goes through the real task class (and torchvision's reader behind it); no network.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from genrun.errors import DataMissing, UserError
from genrun.tasks import vision

SIZE = 16  # task.image_size for the tests: every image comes out 3 x 16 x 16


def _image(path: Path, color: tuple[int, int, int], size=(13, 9), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def write_cifar10(root: Path) -> None:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = np.zeros((2, 3072), dtype=np.uint8)
        data[1] = 255  # a black and a white image: the extremes of [-1, 1]
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [i % 10, 9]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)


def write_cifar100(root: Path) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for name in ("train", "test"):
        data = np.full((3, 3072), 128, dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [0, 57, 99], "coarse_labels": [0, 1, 19]}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{k}" for k in range(100)]}, f)


def write_svhn(root: Path) -> None:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for name in ("train_32x32.mat", "test_32x32.mat"):
        x = np.random.default_rng(0).integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
        savemat(root / name, {"X": x, "y": np.array([[10], [1], [9]], dtype=np.uint8)})


def write_gtsrb(root: Path) -> None:
    base = root / "gtsrb"
    for cls in (0, 1, 42):
        _image(base / "GTSRB" / "Training" / f"{cls:05d}" / f"00000_0000{cls % 10}.ppm", (200, 0, 0), fmt="PPM")
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"])
        for k, cls in enumerate((7, 42)):
            name = f"{k:05d}.ppm"
            _image(base / "GTSRB" / "Final_Test" / "Images" / name, (0, 0, 200), fmt="PPM")
            writer.writerow([name, 13, 9, 1, 1, 12, 8, cls])


def write_food101(root: Path) -> None:
    base = root / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "waffles": ["waffles/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "waffles": ["waffles/5"]}}
    for split, classes in meta.items():
        for items in classes.values():
            for item in items:
                _image(base / "images" / f"{item}.jpg", (255, 255, 255), size=(20, 11))
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(classes))


def write_places365(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    categories = ["/a/airfield", "/b/bakery/shop", "/z/zen_garden"]
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(categories)))
    train, val = [], []
    for i, c in enumerate(categories):
        rel = f"{c}/00000001.jpg"
        _image(root / "data_256_standard" / rel.lstrip("/"), (0, 0, 0))
        train.append(f"{rel} {i}\n")
        name = f"Places365_val_{i + 1:08d}.jpg"
        _image(root / "val_256" / name, (0, 0, 0))
        val.append(f"{name} {i}\n")
    (root / "places365_train_standard.txt").write_text("".join(train))
    (root / "places365_val.txt").write_text("".join(val))


INAT_DIRS = ["00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris",
             "00001_Animalia_Arthropoda_Arachnida_Araneae_Araneidae_Araneus_diadematus"]


def write_inat2021(root: Path) -> None:
    for version in ("2021_train", "2021_valid"):
        for k, d in enumerate(INAT_DIRS):
            _image(root / version / d / f"img{k}.jpg", (10, 200, 10), size=(9, 17))
            img = Image.new("L", (8, 8), 50)  # a greyscale file: the loader makes it RGB
            img.save(root / version / d / f"grey{k}.jpg")


CASES = {  # task class, fixture writer, train size, test size, labels expected in train
    "cifar10": (vision.Cifar10, write_cifar10, 10, 2, {0, 1, 2, 3, 4, 9}),
    "cifar100": (vision.Cifar100, write_cifar100, 3, 3, {0, 57, 99}),
    "svhn": (vision.Svhn, write_svhn, 3, 3, {0, 1, 9}),
    "gtsrb": (vision.Gtsrb, write_gtsrb, 3, 2, {0, 1, 2}),
    "food101": (vision.Food101, write_food101, 3, 2, {0, 1}),
    "places365": (vision.Places365, write_places365, 3, 3, {0, 1, 2}),
    "inat2021": (vision.INat2021, write_inat2021, 4, 4, {0, 1}),
}


@pytest.mark.parametrize("name", CASES)
def test_fixture_in_the_published_format_loads(tmp_path, name):
    cls, write, n_train, n_test, labels = CASES[name]
    write(tmp_path)
    task = cls(data_dir=str(tmp_path), image_size=SIZE)
    assert task.name == name and task.in_channels == 3
    train, evals = task.datasets()
    assert set(evals) == {"test"}
    assert (len(train), len(evals["test"])) == (n_train, n_test)
    xs, ys = zip(*(train[i] for i in range(len(train))))
    x = torch.stack(xs)
    assert x.shape == (n_train, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(ys) == labels and all(0 <= y < task.num_classes for y in ys)
    test_ys = [evals["test"][i][1] for i in range(n_test)]
    assert all(0 <= y < task.num_classes for y in test_ys)


def test_pixels_map_to_minus_one_and_one(tmp_path):
    write_cifar10(tmp_path)
    train, _ = vision.Cifar10(data_dir=str(tmp_path), image_size=SIZE).datasets()
    black, white = train[0][0], train[1][0]
    assert torch.allclose(black, torch.full_like(black, -1.0)) and torch.allclose(white, torch.ones_like(white))


def test_labels_follow_each_format(tmp_path):
    write_svhn(tmp_path / "svhn")  # SVHN stores digit 0 as 10
    _, evals = vision.Svhn(data_dir=str(tmp_path / "svhn"), image_size=SIZE).datasets()
    assert [evals["test"][i][1] for i in range(3)] == [0, 1, 9]
    write_gtsrb(tmp_path / "gtsrb")  # GTSRB's test labels come from GT-final_test.csv
    _, evals = vision.Gtsrb(data_dir=str(tmp_path / "gtsrb"), image_size=SIZE).datasets()
    assert sorted(evals["test"][i][1] for i in range(2)) == [7, 42]
    write_cifar100(tmp_path / "c100")  # fine labels, not coarse
    train, _ = vision.Cifar100(data_dir=str(tmp_path / "c100"), image_size=SIZE).datasets()
    assert [train[i][1] for i in range(3)] == [0, 57, 99]


@pytest.mark.parametrize("name", CASES)
def test_missing_data_is_one_line_naming_the_path_and_the_flag(tmp_path, name):
    cls = CASES[name][0]
    with pytest.raises(DataMissing) as err:
        cls(data_dir=str(tmp_path / "nowhere")).datasets()
    message = str(err.value)
    assert "\n" not in message and "task.download=true" in message
    assert str(tmp_path / "nowhere") in message


def test_a_failed_download_is_a_user_error_not_a_traceback(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"task.download=true: could not fetch CIFAR-10"):
        vision.Cifar10(data_dir=str(tmp_path), image_size=SIZE, download=True).datasets()


def test_image_size_is_checked():
    with pytest.raises(UserError, match="task.image_size"):
        vision.Svhn(image_size=0)


def test_missing_data_through_the_cli_is_one_line(genrun, tmp_path):
    proc = genrun("task=cifar100", f"task.data_dir={tmp_path / 'empty'}", "+experiment=fast", "trainer.progress=off")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("genrun: error: task.data_dir: no CIFAR-100 at ")
    assert "task.download=true" in lines[-1] and "Traceback" not in proc.stderr


def test_a_vision_task_trains_through_the_engine(compose_cfg, tmp_path):
    from genrun.engine import train

    write_svhn(tmp_path / "data")
    cfg = compose_cfg(["task=svhn", f"task.data_dir={tmp_path / 'data'}", "task.image_size=32", "model=resnet18",
                       "optim=gen_sgd", "logger=none", "trainer.max_steps=2", "trainer.batch_size=3",
                       "trainer.progress=off", "trainer.device=cpu"])
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and summary["step"] == 2
    assert 0.0 <= summary["final"]["test"]["acc"] <= 1.0
