"""Object detection and instance segmentation: Penn-Fudan as published, and synthetic scenes.

The paper's Table 5 trains torchvision's Mask R-CNN on Penn-Fudan (the PyTorch detection
tutorial's setting). Penn-Fudan is read from ``<data_dir>/PennFudanPed/PNGImages/*.png`` and
``PedMasks/*_mask.png`` as the archive unpacks: each mask pixel holds its pedestrian's
instance id (0: background), so instance masks are ``mask == id`` and boxes their extents.

``synthetic_scenes`` is procedural: rectangles and ellipses of random colour and size on a
noisy gradient, later shapes occluding earlier ones (each instance's mask is what stays visible).

Batches are ``(images, targets)``: lists of ``[3, H, W]`` images in [0, 1] and of torchvision
target dicts (``boxes`` xyxy along pixel edges, ``labels`` 1..C, ``masks`` ``[N, H, W]`` uint8). The model
contract (torchvision's detection models, ``genrun.models.mask_rcnn``): in train mode
``model(images, targets)`` returns a dict of losses, which the task sums; in eval mode
``model(images)`` returns one dict of ``boxes``, ``labels``, ``scores``, ``masks`` per image.
Metrics: COCO's AP over IoU 0.5:0.95, and AP for small, medium and large objects, for boxes
(``bbox_ap``, ...) and masks (``segm_ap``, ...), via torchmetrics' COCO evaluator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from genrun.errors import DataCorrupt, DataMissing, UserError
from genrun.parallel import in_split_order
from genrun.tasks.base import Task

PENN_FUDAN_URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
# torchmetrics' key -> ours, for each IoU type
AP_KEYS = {"map": "ap", "map_50": "ap50", "map_75": "ap75", "map_small": "ap_s", "map_medium": "ap_m",
           "map_large": "ap_l"}


def instances(mask: torch.Tensor, min_pixels: int = 1,
              categories: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A target dict from an instance-id map ``[H, W]`` (0: background): one mask, box and
    label (``categories[id]``, default 1) per id with at least ``min_pixels`` pixels.

    Boxes run along pixel edges, x2 = last column + 1: a one-pixel-tall object has height 1,
    not the 0 that ``masks_to_boxes``'s inclusive corners give (which COCO cannot match and
    torchvision's detectors refuse to train on).
    """
    from torchvision.ops import masks_to_boxes

    ids = [i for i in torch.unique(mask).tolist() if i != 0 and int((mask == i).sum()) >= min_pixels]
    masks = (mask[None] == torch.tensor(ids, dtype=mask.dtype)[:, None, None]).to(torch.uint8)
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]) if ids else torch.zeros(0, 4)
    labels = torch.tensor([categories[i] if categories else 1 for i in ids], dtype=torch.int64)
    return {"boxes": boxes.float(), "labels": labels, "masks": masks}


class Scenes(Dataset):
    """Images and their targets, held in memory; `collate` keeps both as lists (sizes differ).

    With `flip`, item i of epoch e is mirrored left-right with probability 1/2, decided by
    (seed, e, i) alone (the engine calls `set_epoch`), so a resumed run sees the same flips.
    """

    def __init__(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], flip: bool = False,
                 seed: int | None = None) -> None:
        self.images, self.targets, self.flip = images, targets, flip
        self.seed, self.epoch = torch.initial_seed() if seed is None else seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.images[i], self.targets[i]
        if self.flip and np.random.default_rng([self.seed % 2**63, self.epoch, i]).random() < 0.5:
            width = image.shape[-1]
            boxes = target["boxes"].clone()
            boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]  # edges: x -> width - x
            image, target = image.flip(-1), {**target, "boxes": boxes, "masks": target["masks"].flip(-1)}
        return image, target

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
        return [image for image, _ in items], [target for _, target in items]


class DetectionTask(Task):
    """Loss: the sum of the detector's losses. Metrics: COCO AP for boxes and masks."""

    heavy_items = True  # an image decoded (or a scene drawn) and its masks built per item

    num_categories: int

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, targets = batch
        return sum(model(images, targets).values())

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, to_device) -> dict[str, list[dict[str, torch.Tensor]]]:
        preds, truths = [], []  # COCO AP is not a mean over images: keep the detections
        for batch in loader:
            images, targets = to_device(batch)
            preds += [_binary(o) for o in model(images)]
            truths += [{k: t[k].cpu() for k in ("boxes", "labels", "masks")} for t in targets]
        return {"preds": preds, "targets": truths}

    def score(self, parts: list[dict[str, list[dict[str, torch.Tensor]]]]) -> dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type=("bbox", "segm"))
        # in the split's order: COCO's ranking of equal scores follows the order images came in
        metric.update(in_split_order([p["preds"] for p in parts]), in_split_order([p["targets"] for p in parts]))
        results = metric.compute()
        return {f"{iou}_{ours}": float(results[f"{iou}_{theirs}"])
                for iou in ("bbox", "segm") for theirs, ours in AP_KEYS.items()}

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        for split, metrics in results.items():
            if metrics.get("bbox_ap", 1.0) <= 0.01:
                return (f"{split} box AP {metrics['bbox_ap']:.3f}: the detector finds nothing; "
                        "metrics.jsonl has its loss and lr per step")
        return None


def _binary(output: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mask R-CNN's soft masks ``[N, 1, H, W]`` thresholded at 0.5, as COCO's evaluation expects."""
    return {"boxes": output["boxes"].cpu(), "scores": output["scores"].cpu(), "labels": output["labels"].cpu(),
            "masks": (output["masks"][:, 0] > 0.5).to(torch.uint8).cpu()}


def _check_categories(given: int, actual: int, task: str) -> None:
    if given != actual:
        raise UserError(f"task.num_categories={given}: {task} has {actual}")


def _split(count: int, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < test_size < count:
        raise UserError(f"task.test_size={test_size} is invalid: must be between 1 and {count - 1} "
                        f"(images found: {count})")
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[:-test_size]), np.sort(order[-test_size:])


class PennFudan(DetectionTask):
    """Penn-Fudan pedestrians (170 images, 345 people, one category), with a fixed test split;
    training images are flipped left-right at random (`flip`), as in torchvision's tutorial."""

    num_categories = 1

    def __init__(self, data_dir: str, name: str = "penn_fudan", num_categories: int = 1, test_size: int = 50,
                 split_seed: int = 0, flip: bool = True, download: bool = False) -> None:
        _check_categories(num_categories, self.num_categories, name)
        self.name, self.root, self.flip = name, Path(data_dir).expanduser(), flip
        self.test_size, self.split_seed, self.download = test_size, split_seed, download

    def _folder(self) -> Path:
        folder = self.root / "PennFudanPed"
        if not (folder / "PNGImages").is_dir() and self.download:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(PENN_FUDAN_URL, download_root=str(self.root))
        if not (folder / "PNGImages").is_dir() or not (folder / "PedMasks").is_dir():
            raise DataMissing(f"task.data_dir: no Penn-Fudan (PNGImages/, PedMasks/) at {folder}; run with "
                              f"task.download=true (needs internet) or unzip PennFudanPed.zip into {self.root}")
        return folder

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        folder = self._folder()
        names = sorted(p.name for p in (folder / "PNGImages").glob("*.png"))
        images, targets = [], []
        for name in names:
            mask_path = folder / "PedMasks" / name.replace(".png", "_mask.png")
            if not mask_path.is_file():
                raise DataMissing(f"task.data_dir: {mask_path} is missing; Penn-Fudan has one mask per image")
            image, mask = _read_image(folder / "PNGImages" / name, "RGB"), _read_image(mask_path, None)
            images.append(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
            targets.append(instances(torch.from_numpy(mask.astype(np.int64))))
        train, test = _split(len(names), self.test_size, self.split_seed)
        return (Scenes([images[i] for i in train], [targets[i] for i in train], flip=self.flip),
                {"test": Scenes([images[i] for i in test], [targets[i] for i in test])})


def _read_image(path: Path, mode: str | None) -> np.ndarray:
    """An image file's pixels (converted to `mode`); a damaged file is a DataCorrupt naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.array(image.convert(mode) if mode else image)
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataCorrupt(f"task.data_dir: {path} is not a readable image ({str(err)[:160]}); "
                          "unzip PennFudanPed.zip again") from None


class SyntheticScenes(DetectionTask):
    """SYNTHETIC. Rectangles (category 1) and ellipses (category 2) on a noisy gradient (module doc)."""

    num_categories = 2

    def __init__(self, name: str = "synthetic_scenes", num_categories: int = 2, size: int = 128, train_size: int = 400,
                 test_size: int = 100, max_objects: int = 4, min_side: int = 12, max_side: int = 64,
                 data_seed: int = 0) -> None:
        _check_categories(num_categories, self.num_categories, name)
        if not 4 <= min_side <= max_side <= size:
            raise UserError(f"task.min_side={min_side}, task.max_side={max_side}: need 4 <= min_side <= max_side "
                            f"<= task.size={size}")
        self.name, self.size, self.sizes = name, size, (train_size, test_size)
        self.max_objects, self.sides, self.data_seed = max_objects, (min_side, max_side), data_seed

    def scene(self, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One image and its target: objects painted in order, later ones on top."""
        n = self.size
        yy, xx = np.mgrid[0:n, 0:n] / n
        tint = rng.uniform(0.2, 0.8, size=(3, 1, 1))
        image = tint + 0.2 * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1)) + rng.normal(0, 0.05, (3, n, n))
        ids = np.zeros((n, n), dtype=np.int64)
        categories = {}
        for k in range(rng.integers(1, self.max_objects + 1)):
            h, w = rng.integers(self.sides[0], self.sides[1] + 1, size=2)
            top, left = rng.integers(0, n - h + 1), rng.integers(0, n - w + 1)
            ellipse = bool(rng.integers(2))
            if ellipse:
                cy, cx = top + h / 2, left + w / 2
                inside = ((yy * n + 0.5 - cy) / (h / 2)) ** 2 + ((xx * n + 0.5 - cx) / (w / 2)) ** 2 <= 1
            else:
                inside = np.zeros((n, n), dtype=bool)
                inside[top:top + h, left:left + w] = True
            image[:, inside] = rng.uniform(0, 1, size=(3, 1))
            ids[inside] = k + 1
            categories[k + 1] = 2 if ellipse else 1
        # hidden or nearly hidden shapes are not objects
        target = instances(torch.from_numpy(ids), min_pixels=16, categories=categories)
        return torch.from_numpy(np.clip(image, 0, 1)).float(), target

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        out = []
        for offset, count in enumerate(self.sizes):
            rng = np.random.default_rng([self.data_seed, offset])
            out.append(Scenes(*map(list, zip(*(self.scene(rng) for _ in range(count))))))
        return out[0], {"test": out[1]}
