"""Detection and instance segmentation: Penn-Fudan's files, the synthetic scenes, COCO AP, Mask R-CNN, runs.

Fixtures are Penn-Fudan in its real layout: RGB PNGs in PNGImages/ and, in PedMasks/, one
8-bit PNG per image whose pixels hold instance ids (0: background).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import GENRUN, scored_in_shares
from genrun.errors import DataMissing, UserError
from genrun.models import mask_rcnn
from genrun.tasks.detection import PennFudan, SyntheticScenes

# per image: (height, width, [(top, left, bottom, right) of each pedestrian, inclusive])
PEOPLE = [(40, 50, [(5, 4, 30, 15), (10, 30, 35, 44)]), (36, 36, [(2, 2, 20, 12)]),
          (44, 40, [(1, 1, 10, 10), (12, 15, 40, 25), (20, 28, 30, 38)]), (30, 30, [(3, 3, 25, 20)])]


def write_penn_fudan(root: Path, people=PEOPLE) -> Path:
    folder = root / "PennFudanPed"
    (folder / "PNGImages").mkdir(parents=True)
    (folder / "PedMasks").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w, boxes) in enumerate(people, start=1):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "PNGImages" / f"FudanPed{i:05d}.png")
        ids = np.zeros((h, w), dtype=np.uint8)
        for k, (top, left, bottom, right) in enumerate(boxes, start=1):
            ids[top:bottom + 1, left:right + 1] = k
        Image.fromarray(ids, mode="L").save(folder / "PedMasks" / f"FudanPed{i:05d}_mask.png")
    return folder


def test_penn_fudan_reads_instances_boxes_and_a_fixed_split(tmp_path):
    write_penn_fudan(tmp_path)
    train, evals = PennFudan(str(tmp_path), test_size=1, flip=False).datasets()
    test = evals["test"]
    assert len(train) == 3 and len(test) == 1
    seen = {}
    for data in (train, test):
        for image, target in data:
            seen[image.shape[1:]] = target
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    for h, w, boxes in PEOPLE:
        target = seen[(h, w)]
        expected = torch.tensor([[left, top, right + 1, bottom + 1] for top, left, bottom, right in boxes],
                                dtype=torch.float32)  # pixel edges: the last column's right edge
        assert torch.equal(target["boxes"], expected)
        assert target["labels"].tolist() == [1] * len(boxes)
        assert target["masks"].shape == (len(boxes), h, w)
        areas = [(bottom - top + 1) * (right - left + 1) for top, left, bottom, right in boxes]
        assert target["masks"].sum((1, 2)).tolist() == areas
    again, _ = PennFudan(str(tmp_path), test_size=1).datasets()
    assert [i.shape for i in again.images] == [i.shape for i in train.images]
    other, _ = PennFudan(str(tmp_path), test_size=1, split_seed=3).datasets()
    assert len(other) == 3


def test_training_flips_mirror_image_masks_and_boxes_by_seed_epoch_and_index(tmp_path):
    write_penn_fudan(tmp_path)
    train, evals = PennFudan(str(tmp_path), test_size=1).datasets()
    assert not evals["test"].flip
    flipped = 0
    for epoch in range(4):
        train.set_epoch(epoch)
        for i in range(len(train)):
            image, target = train[i]
            assert torch.equal(train[i][0], image)  # the same item of the same epoch: the same draw
            mirrored = not torch.equal(image, train.images[i])
            flipped += mirrored
            if mirrored:
                assert torch.equal(image, train.images[i].flip(-1))
                assert torch.equal(target["masks"], train.targets[i]["masks"].flip(-1))
            for mask, box in zip(target["masks"].bool(), target["boxes"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    assert 0 < flipped < 4 * len(train)


def test_penn_fudan_missing_files_are_one_line_errors(tmp_path):
    message = r"no Penn-Fudan \(PNGImages/, PedMasks/\) at .*PennFudanPed; run with task.download"
    with pytest.raises(DataMissing, match=message):
        PennFudan(str(tmp_path)).datasets()
    folder = write_penn_fudan(tmp_path)
    with pytest.raises(UserError, match="task.test_size=4 is invalid: must be between 1 and 3"):
        PennFudan(str(tmp_path), test_size=4).datasets()
    (folder / "PedMasks" / "FudanPed00002_mask.png").unlink()
    with pytest.raises(DataMissing, match="FudanPed00002_mask.png is missing"):
        PennFudan(str(tmp_path), test_size=1).datasets()
    with pytest.raises(UserError, match="task.num_categories=2: penn_fudan has 1"):
        PennFudan(str(tmp_path), num_categories=2)


def test_synthetic_scenes_are_fixed_by_the_seed_with_disjoint_visible_masks():
    task = SyntheticScenes(size=64, train_size=20, test_size=5, min_side=8, max_side=32)
    train, evals = task.datasets()
    again, _ = SyntheticScenes(size=64, train_size=20, test_size=5, min_side=8, max_side=32).datasets()
    assert all(torch.equal(a, b) for a, b in zip(train.images, again.images))
    assert not torch.equal(train.images[0], evals["test"].images[0])
    for image, target in (*train, *evals["test"]):
        masks = target["masks"].bool()
        assert image.shape == (3, 64, 64) and len(masks) >= 1
        assert masks.sum(0).max() <= 1  # an occluded shape keeps only what stays visible
        assert set(target["labels"].tolist()) <= {1, 2} and (masks.sum((1, 2)) >= 16).all()
        for mask, box in zip(masks, target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    with pytest.raises(UserError, match="task.min_side=40, task.max_side=20"):
        SyntheticScenes(min_side=40, max_side=20)


class Oracle(torch.nn.Module):
    """Answers with the ground truth (or nothing): what COCO AP should score 1 (or 0)."""

    def __init__(self, targets, empty: bool = False) -> None:
        super().__init__()
        self.targets, self.empty, self.seen = targets, empty, 0

    def forward(self, images):
        out = []
        for _ in images:
            target = self.targets[self.seen]
            self.seen += 1
            keep = slice(0, 0) if self.empty else slice(None)
            out.append({"boxes": target["boxes"][keep], "labels": target["labels"][keep],
                        "scores": torch.ones(len(target["boxes"]))[keep],
                        "masks": target["masks"][keep, None].float()})
        return out


def test_coco_ap_is_one_for_the_truth_and_zero_for_nothing():
    task = SyntheticScenes(size=64, train_size=1, test_size=6, min_side=8, max_side=40)
    test = task.datasets()[1]["test"]
    loader = torch.utils.data.DataLoader(test, batch_size=4, collate_fn=test.collate)
    perfect = task.evaluate(Oracle(test.targets), loader, lambda b: b)
    assert perfect["bbox_ap"] == pytest.approx(1.0) and perfect["segm_ap"] == pytest.approx(1.0)
    assert {"bbox_ap50", "bbox_ap_s", "bbox_ap_m", "segm_ap_l"} <= set(perfect)
    nothing = task.evaluate(Oracle(test.targets, empty=True), loader, lambda b: b)
    assert nothing["bbox_ap"] == 0.0 and nothing["segm_ap"] == 0.0
    assert "finds nothing" in task.diagnose({"test": nothing}) and task.diagnose({"test": perfect}) is None


class NoisyOracle(torch.nn.Module):
    """The ground truth of each image (found by the image itself, so any order of images works),
    boxes shifted by a per-image amount and every other image's last instance dropped."""

    def __init__(self, images, targets) -> None:
        super().__init__()
        self.truth = {float(image.sum()): (i, t) for i, (image, t) in enumerate(zip(images, targets))}

    def forward(self, images):
        out = []
        for image in images:
            i, target = self.truth[float(image.sum())]
            keep = slice(None) if i % 2 else slice(0, max(1, len(target["boxes"]) - 1))
            out.append({"boxes": target["boxes"][keep] + 2.0 * i, "labels": target["labels"][keep],
                        "scores": torch.linspace(1.0, 0.5, len(target["boxes"]))[keep],
                        "masks": target["masks"][keep, None].float()})
        return out


def test_shares_of_a_split_score_as_the_whole_split_does():
    # COCO AP is not a mean over images: the shares' detections are pooled before scoring
    task = SyntheticScenes(size=64, train_size=1, test_size=7, min_side=8, max_side=40)
    test = task.datasets()[1]["test"]
    images, targets = test.collate(list(test))
    shared, whole = scored_in_shares(task, NoisyOracle(images, targets), test, batch_size=2)
    assert shared == pytest.approx(whole, rel=1e-6) and 0.05 < whole["bbox_ap"] < 0.95


def test_mask_rcnn_trains_and_predicts_for_the_tasks_categories():
    torch.manual_seed(0)
    model = mask_rcnn(num_categories=2, backbone="resnet18", min_size=64, max_size=64, box_features=32)
    task = SyntheticScenes(size=64, train_size=2, test_size=1, min_side=8, max_side=32)
    images, targets = task.datasets()[0].collate(list(task.datasets()[0]))
    model.train()
    losses = model(images, targets)
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} == set(losses)
    task.loss(model, (images, targets)).backward()
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # 2 categories + background
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["masks"].shape[1:] == (1, 64, 64)


def test_mask_rcnn_settings_that_cannot_work_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="model.backbone=vgg is not one of resnet18, resnet34, resnet50"):
        mask_rcnn(1, backbone="vgg")
    with pytest.raises(UserError, match="COCO weights exist for backbone=resnet50 only"):
        mask_rcnn(1, backbone="resnet18", pretrained=True)
    bad = tmp_path / "w.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(UserError, match="not a Mask R-CNN ResNet-50 FPN state_dict"):
        mask_rcnn(1, pretrained=str(bad))


TINY = ["model=mask_rcnn", "model.backbone=resnet18", "model.min_size=64", "model.max_size=64",
        "model.box_features=32", "trainer.batch_size=2", "trainer.progress=off", "logger=none"]


def test_gen_sgd_trains_mask_rcnn_on_penn_fudan_files(genrun, tmp_path):
    write_penn_fudan(tmp_path / "data")
    run = tmp_path / "run"
    proc = genrun("task=penn_fudan", f"task.data_dir={tmp_path / 'data'}", "task.test_size=2", *TINY,
                  "optim=gen_sgd", "optim.lr=0.001", "optim.gen.every=1", "trainer.epochs=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 2
    test = summary["final"]["test"]
    assert {f"{iou}_{k}" for iou in ("bbox", "segm") for k in ("ap", "ap50", "ap_s", "ap_m", "ap_l")} <= set(test)
    records = [json.loads(line) for line in (run / "gen.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(len(r["losses"]) == len(r["points"]) for r in records)


def test_table5_preset_composes_both_rows_as_the_tutorial_sets_them(compose_cfg):
    from genrun.validate import validate

    for row in ("manual", "gen"):
        cfg = compose_cfg(["+experiment=table5", f"experiment/table5_row={row}"])
        validate(cfg)
        assert cfg.task.name == "penn_fudan" and cfg.model.pretrained is True and cfg.model.backbone == "resnet50"
        assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.005, 0.9, 5e-4)
        assert cfg.trainer.batch_size == 2 and cfg.trainer.epochs == 2
        assert ("gen" in cfg.optim) == (row == "gen")
        if row == "manual":
            assert cfg.sched._target_ == "genrun.sched.warmup_constant" and cfg.sched.warmup == 0.5


def test_table5_offline_preset_trains_from_scratch_with_the_warm_up_over_its_first_epoch(compose_cfg):
    from genrun.validate import validate

    for row in ("manual", "gen"):
        cfg = compose_cfg(["+experiment=table5_offline", f"experiment/table5_row={row}"])
        validate(cfg)
        assert cfg.task.name == "synthetic_scenes" and cfg.model.pretrained is False
        assert cfg.table5.row == row and ("gen" in cfg.optim) == (row == "gen")
        if row == "manual":
            assert cfg.sched.warmup * cfg.trainer.epochs == pytest.approx(1.0, abs=0.01)


def test_table5_cells_are_mean_and_std_over_seeds_and_skip_empty_size_classes():
    from omegaconf import OmegaConf

    from genrun.report import table5
    from genrun.report.runs import Run

    def run(row, seed, ap, ap_l=-1.0, status="finished"):
        cfg = OmegaConf.create({"task": {"name": "penn_fudan"}, "table5": {"row": row}, "seed": seed})
        final = {"test": {"bbox_ap": ap, "bbox_ap_s": 0.1, "bbox_ap_m": 0.2, "bbox_ap_l": ap_l,
                          "segm_ap": ap / 2, "segm_ap_s": 0.1, "segm_ap_m": 0.2, "segm_ap_l": ap_l}}
        summary = {"status": status, "final": final if status == "finished" else {}}
        return Run(Path(f"/nonexistent/{row}{seed}"), cfg, summary)

    rows = table5.collect([run("gen", 0, 0.6), run("gen", 1, 0.8), run("manual", 0, 0.5, ap_l=0.7),
                           run("manual", 1, 0.0, status="diverged")])
    assert list(rows) == ["manual", "gen"]
    assert table5.cell(rows["gen"], "bbox_ap") == "0.700 ± 0.141"
    assert table5.cell(rows["gen"], "bbox_ap_l") == "n/a"  # COCO's -1: no large objects in the test split
    assert table5.cell(rows["manual"], "bbox_ap_l") == "0.700"
    text = table5.render_markdown(rows)
    assert "| manual (warm-up, then constant) | 2 (1 diverged) | 0.500 | 0.100 | 0.200 | 0.700 |" in text
    assert "| GeN-SGD | | 0.805 ± 0.038 |" in text and "## Segmentation (masks)" in text


def test_table5_sweep_and_its_report(genrun, tmp_path):
    write_penn_fudan(tmp_path / "data")
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "+experiment=table5", f"task.data_dir={tmp_path / 'data'}", "task.test_size=2",
                  "model.pretrained=false", *TINY[1:5], "trainer.max_steps=1", "trainer.progress=off", "logger=none",
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    report = subprocess.run([str(GENRUN.with_name("genrun-report")), str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    text = (sweep / "table5.md").read_text()
    assert "Table 5: Mask R-CNN on penn_fudan" in text and "SYNTHETIC" not in text
    assert "| manual (warm-up, then constant) | 1 |" in text and "| GeN-SGD | 1 |" in text
    assert (sweep / "table5_curves.png").stat().st_size > 0


def test_a_classifier_on_a_detection_task_is_a_one_line_error(genrun, tmp_path):
    proc = genrun("task=synthetic_scenes", "model=small_cnn", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "models that fit this task: mask_rcnn" in proc.stderr
    assert not (tmp_path / "run").exists()
