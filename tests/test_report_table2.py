"""Table 2 presets compose for every cell, and `genrun-report` renders Table 2 from a (fake) sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF
from genrun.report import main as report_main, table2
from genrun.validate import validate


@pytest.fixture(scope="module")
def compose_many():
    """compose(overrides) inside one Hydra initialisation: the grid has ~150 cells to check."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda overrides: compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()

PRESETS = {name: OmegaConf.load(CONF / "experiment" / f"{name}.yaml") for name in ("table2", "table2_offline")}


def sweep_axes(preset: str) -> tuple[list[str], list[str]]:
    params = PRESETS[preset].hydra.sweeper.params
    split = lambda s: [v.strip() for v in str(s).split(",")]  # noqa: E731
    return split(params.task), split(params["experiment/table2_row"])


def test_table2_grid_is_the_papers():
    tasks, rows = sweep_axes("table2")
    assert tasks == table2.DATASETS and rows == list(table2.PAPER)


def test_table2_cells_compose_as_the_paper_says(compose_many, tmp_path):
    # Row and data set are independent groups, so every row is composed on the three kinds of
    # column (Φ 4 and 5 epochs; Φ 20; Φ 20 and 10 epochs) and every data set with the GeN rows:
    # that covers each cell's parts (a compose costs ~0.3 s; all 84 would dominate the suite).
    rows = sweep_axes("table2")[1]
    cells = [(t, r) for t in ("cifar10", "places365", "inat2021") for r in rows]
    cells += [(t, r) for t in table2.DATASETS if t not in ("cifar10", "places365", "inat2021")
              for r in ("gen_sgd", "gen_adamw")]
    for task, row in cells:
        cfg = compose_many(["+experiment=table2", f"task={task}", f"experiment/table2_row={row}",
                           f"task.data_dir={tmp_path}"])
        validate(cfg)
        assert cfg.table2.row == row and cfg.task.name == task
        assert cfg.trainer.batch_size == 500 and cfg.task.image_size == 224 and cfg.model.pretrained is True
        assert cfg.trainer.epochs == (10 if task == "inat2021" else 5)
        family = cfg.table2.family
        assert cfg.model.arch == {"sgd": "resnet50", "adamw": "vit_base"}[family]
        assert cfg.model.num_classes == cfg.task.num_classes
        if row in ("gen_sgd", "sgd_constant", "sgd_linear", "sgd_cosine"):
            assert cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
        if row in ("gen_adamw", "adamw_constant", "adamw_linear", "adamw_cosine"):
            assert cfg.optim.lr == 1e-4 and cfg.optim.name == "adamw"
        assert ("gen" in cfg.optim) == row.startswith("gen_")
        if row.startswith("gen_"):
            assert cfg.optim.gen.every == (20 if task in ("places365", "inat2021") else 4)
            assert cfg.optim.gen.horizon == ("linear" if task in ("places365", "inat2021") else "none")  # C.7
        if row == "dadapt_sgd":
            assert cfg.optim.weight_decay == 0.0
        schedule = {"linear": "linear", "cosine": "cosine"}.get(row.split("_")[-1], "constant")
        assert cfg.sched._target_.rsplit(".", 1)[-1] == schedule
        instantiate(cfg.task)  # builds without reading data


@pytest.mark.parametrize("task", ["digits", "mnist5k"])
def test_every_offline_cell_composes_and_builds(compose_many, task):
    from genrun.optim import build_optimizer

    _, rows = sweep_axes("table2_offline")
    assert set(table2.PAPER) <= set(rows)
    lrs = {}
    for row in rows if task == "digits" else ["gen_sgd", "sgd_cosine_hi", "gen_adamw_lo", "prodigy", "dog"]:
        cfg = compose_many(["+experiment=table2_offline", f"task={task}", f"experiment/table2_row={row}"])
        validate(cfg)
        assert cfg.model._target_ == "genrun.models.SmallCNN" and cfg.trainer.batch_size == 64
        assert cfg.trainer.epochs == PRESETS["table2_offline"].table2.epochs[task]  # per-task length resolves
        if row.startswith("gen_"):
            # the rows' fallback repeats conf/optim/gen/default.yaml's horizon (YAML cannot point at it):
            # keep them equal
            default = compose_many(["optim=gen_sgd"]).optim.gen.horizon
            assert cfg.optim.gen.horizon == default == "cosine"  # unlike the paper-scale preset
        build_optimizer(cfg.optim, instantiate(cfg.model))
        lrs[row] = cfg.optim.lr
    if task == "digits":
        for gen in ("gen_sgd", "gen_adamw"):  # default η0 and 1000x below it (C.4.1)
            assert lrs[gen] / lrs[f"{gen}_lo"] == pytest.approx(1000)
        assert lrs["gen_sgd"] == 0.05 and lrs["gen_adamw"] == 1e-3  # conf/optim/sgd.yaml, adamw.yaml defaults
        assert sorted({lrs[r] for r in rows if r.startswith("sgd_cosine")}) == [0.01, 0.05, 0.2]


def _fake_run(root: Path, num: int, task: str, row: str, variant: str, lr: float, status: str, acc: float | None,
              family: str, classes: int | None = None) -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    cfg = {"task": {"name": task, "num_classes": classes}, "optim": {"lr": lr}, "seed": 0,
           "table2": {"row": row, "family": family, "lr_variant": variant}}
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    (run / ".hydra" / "overrides.yaml").write_text(f"- task={task}\n- experiment/table2_row={row}\n")
    final = {"test": {"acc": acc / 100, "loss": 0.1}} if acc is not None else {}
    (run / "summary.json").write_text(json.dumps({"status": status, "final": final}))
    records = [{"kind": "train", "step": s, "lr": [lr * (1 + s)]} for s in range(1, 5)]
    records += [{"kind": "eval", "step": s, "split": "test", "acc": (acc or 10) / 100, "loss": 0.1} for s in (2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_renders_table2_with_paper_numbers_best_and_diverged(tmp_path):
    runs = [
        ("cifar10", "gen_sgd", "default", 0.1, "finished", 96.5, "sgd"),
        ("cifar10", "sgd_cosine", "default", 0.1, "finished", 95.0, "sgd"),
        ("cifar10", "sgd_cosine", "lo", 0.01, "finished", 95.9, "sgd"),
        ("cifar10", "dadapt_sgd", "default", 1.0, "diverged", None, "sgd"),
        ("cifar10", "gen_adamw", "default", 1e-4, "finished", 98.0, "adamw"),
        ("cifar10", "prodigy", "default", 1.0, "finished", 98.9, "adamw"),
        ("digits", "gen_sgd", "default", 0.05, "finished", 98.0, "sgd"),
        ("digits", "gen_sgd", "lo", 5e-5, "finished", 97.5, "sgd"),
        ("digits", "sgd_constant", "hi", 0.2, "finished", 98.4, "sgd"),
    ]
    for i, run in enumerate(runs):
        _fake_run(tmp_path, i, *run)
    assert report_main([str(tmp_path)]) == 0
    text = (tmp_path / "table2.md").read_text()
    lines: dict[str, str] = {}
    for line in text.splitlines():  # the accuracy table comes first; the lr table repeats its row names
        if line.startswith("| "):
            lines.setdefault(line.split("|")[1].strip(), line)
    header = lines["optimizer"]
    assert header.index("cifar10") < header.index("digits")  # the paper's data sets first
    assert "**96.50** (96.76)" in lines["GeN-SGD"]          # ours, bold (best SGD row), the paper's beside it
    assert "95.90 (95.82)" in lines["SGD(cosine decay)"]     # the best lr of the grid
    assert "diverged (95.20)" in lines["D-adapt SGD"]
    assert "**98.90** (98.92)" in lines["Prodigy"] and "98.00 (98.68)" in lines["GeN-AdamW"]
    assert "best of 2 lrs: 0.01" in text
    check = next(line for line in text.splitlines() if line.startswith("| digits | GeN-SGD"))
    assert "-0.40" in check and "1000x" in check and "| 0.50 | yes |" in check
    assert (tmp_path / "table2_curves_cifar10.png").stat().st_size > 0
    assert (tmp_path / "table2_curves_digits.png").exists()


def test_report_ignores_sweeps_without_table2_rows(tmp_path):
    assert not table2.applies([])


def test_report_averages_seeds_and_shows_the_diverged_ones(tmp_path):
    runs = [
        ("digits", "gen_sgd", "default", 0.05, "finished", 98.0, "sgd"),
        ("digits", "gen_sgd", "default", 0.05, "finished", 97.0, "sgd"),
        ("digits", "gen_sgd", "default", 0.05, "diverged", None, "sgd"),
        ("digits", "sgd_constant", "default", 0.05, "finished", 96.0, "sgd"),
        ("digits", "sgd_constant", "default", 0.05, "finished", 99.0, "sgd"),
        ("digits", "sgd_constant", "default", 0.05, "finished", 99.0, "sgd"),
    ]
    for i, run in enumerate(runs):
        _fake_run(tmp_path, i, *run)
    assert report_main([str(tmp_path)]) == 0
    text = (tmp_path / "table2.md").read_text()
    assert "mean over 3 seeds" in text
    gen = next(line for line in text.splitlines() if line.startswith("| GeN-SGD"))
    assert "97.50 (1/3 diverged)" in gen                      # mean of the two that finished, loss made visible
    assert "**98.00**" in next(line for line in text.splitlines() if line.startswith("| SGD(constant)"))
    check = next(line for line in text.splitlines() if line.startswith("| digits | GeN-SGD"))
    assert "| -0.50 | no |" in check                           # a diverged seed fails the target


def test_report_flags_seeds_that_finished_at_chance(tmp_path):
    runs = [
        ("mnist5k", "gen_sgd", "default", 0.05, "finished", 96.0, "sgd", 10),
        ("mnist5k", "gen_sgd", "default", 0.05, "finished", 96.0, "sgd", 10),
        ("mnist5k", "gen_sgd", "default", 0.05, "finished", 11.4, "sgd", 10),   # one class for everything
        ("mnist5k", "sgd_linear", "hi", 0.2, "finished", 96.0, "sgd", 10),
        ("mnist5k", "sgd_linear", "hi", 0.2, "finished", 10.0, "sgd", 10),
        ("mnist5k", "sgd_linear", "hi", 0.2, "finished", 95.0, "sgd", 10),
        ("mnist5k", "sgd_cosine", "hi", 0.2, "finished", 15.5, "sgd", 10),      # poor, but above 1.5x chance
    ]
    for i, run in enumerate(runs):
        _fake_run(tmp_path, i, *run)
    assert report_main([str(tmp_path)]) == 0
    lines = (tmp_path / "table2.md").read_text().splitlines()
    row = lambda label: next(line for line in lines if line.startswith(f"| {label}"))  # noqa: E731
    assert "67.00 (1/3 at chance)" in row("SGD(linear decay)")   # counted in the mean, and shown
    assert "15.50 |" in row("SGD(cosine decay)") and "chance" not in row("SGD(cosine decay)")
    assert "67.80 (1/3 at chance)" in row("GeN-SGD")
    check = row("mnist5k | GeN-SGD").split("|")
    assert check[5].strip() == "+0.80" and check[6].strip() == "no"  # within 0.5 on the mean, but a dead seed fails


def test_offline_preset_runs_as_a_sweep_and_reports(genrun, tmp_path):
    # the preset's own launcher (joblib), threads and seed axis, cut to 2 rows x 2 seeds x 3 steps
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "+experiment=table2_offline", "task=digits", "experiment/table2_row=gen_sgd,sgd_constant",
                  "seed=0,1", "trainer.max_steps=3", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    jobs = [OmegaConf.load(p) for p in sweep.glob("*/.hydra/config.yaml")]
    assert len(jobs) == 4 and {j.trainer.threads for j in jobs} == {1} and {j.seed for j in jobs} == {0, 1}
    assert report_main([str(sweep)]) == 0
    text = (sweep / "table2.md").read_text()
    assert "mean over 2 seeds" in text and "| digits | GeN-SGD |" in text
