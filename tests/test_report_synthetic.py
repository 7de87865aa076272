"""`genrun-report` on a tiny fake SYNTHETIC sweep dir: lr choice, thresholds, divergence, files."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from genrun.report import main
from genrun.report.runs import load_runs
from genrun.report.synthetic import applies, choose, curves


def _fake_run(root: Path, num: int, task: str, optim: str, lr: float, objectives: list, *,
              gen: bool = False, status: str = "finished") -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    start = {"rosenbrock": [-1.5, 2.0], "beale": [1.0, 1.5]}[task]
    cfg = {"task": {"_target_": f"genrun.tasks.synthetic.{task.capitalize()}", "name": task, "start": start,
                    "iterations": len(objectives)},
           "optim": {"name": optim, "lr": lr, **({"gen": {"every": 4}} if gen else {})}}
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"task={task}", f"optim={'gen_' if gen else ''}{optim}", f"optim.lr={lr}"]),
                   run / ".hydra" / "overrides.yaml")
    lines = []
    for step, f in enumerate(objectives, start=1):
        lines.append(json.dumps({"kind": "train", "step": step, "loss": 0.0, "x1": start[0] + 0.01 * step,
                                 "x2": start[1] - 0.01 * step, "objective": f}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "summary.json").write_text(json.dumps({"status": status, "step": len(objectives), "final": {}}))


def _sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    n = iter(range(100))
    # SGD: lr 0.01 reaches 1e-3 at step 3 and 1e-6 at step 5; lr 0.1 diverges; lr 0.001 is slow
    _fake_run(root, next(n), "rosenbrock", "sgd", 0.01, [1.0, 0.1, 1e-3, 1e-5, 1e-7, 1e-8])
    _fake_run(root, next(n), "rosenbrock", "sgd", 0.1, [50.0, 1e6, None, None, None, None], status="diverged")
    _fake_run(root, next(n), "rosenbrock", "sgd", 0.001, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    # Adam: two lrs end at exactly 0; the one that gets to 1e-6 first wins the tie
    _fake_run(root, next(n), "rosenbrock", "adam", 0.01, [1.0, 0.1, 1e-4, 1e-7, 0.0, 0.0])
    _fake_run(root, next(n), "rosenbrock", "adam", 0.02, [1.0, 1e-7, 0.0, 0.0, 0.0, 0.0])
    # GeN-SGD: its default η0 (0.05, conf/optim/sgd.yaml) is shown even though 0.001 ends lower
    _fake_run(root, next(n), "rosenbrock", "sgd", 0.05, [1.0, 1e-2, 1e-4, 1e-5, 1e-6, 1e-6], gen=True)
    _fake_run(root, next(n), "rosenbrock", "sgd", 0.001, [1.0, 1e-9, 1e-10, 1e-11, 1e-12, 0.0], gen=True)
    _fake_run(root, next(n), "beale", "adagrad", 0.5, [30.0, 20.0, 10.0, 1.0, 0.1, 0.01])
    _fake_run(root, next(n), "beale", "adagrad", 0.01, [40.0, 39.0, 38.0, 37.0, 36.0, 35.0], gen=True)
    return root


def test_choice_rules(tmp_path):
    runs = load_runs(_sweep(tmp_path))
    assert applies(runs)
    chosen = choose(curves(runs), "rosenbrock")
    assert list(chosen) == ["GeN-SGD", "SGD", "Adam"]
    sgd = chosen["SGD"].curve
    assert sgd.lr == 0.01 and sgd.reached(1e-3) == 3 and sgd.reached(1e-6) == 5
    assert chosen["Adam"].curve.lr == 0.02  # tie at 0: first to 1e-6
    gen = chosen["GeN-SGD"]
    assert gen.curve.lr == 0.05 and gen.how == "default η0" and len(gen.candidates) == 2
    diverged = [c for c in chosen["SGD"].candidates if c.lr == 0.1][0]
    assert diverged.final == float("inf")
    assert sgd.points[0][0] == 0 and sgd.points[0][3] == 12.5  # the start is iteration 0


def test_report_writes_markdown_and_figures_into_the_sweep_dir(tmp_path, capsys):
    root = _sweep(tmp_path)
    assert main([str(root)]) == 0
    md = (root / "synthetic.md").read_text()
    for png in ("synthetic_rosenbrock.png", "synthetic_beale.png"):
        assert (root / png).stat().st_size > 10_000 and png in md
    assert "SYNTHETIC" in md and "## Rosenbrock (synthetic)" in md and "## Beale (synthetic)" in md
    rows: dict[str, str] = {}
    for line in md.splitlines():  # the first row per optimizer: the main table
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert "| 0.01 (best of 3 lr) | 1e-08 | 3 | 5 |" in rows["SGD"]
    assert "0.05 (default η0)" in rows["GeN-SGD"] and "| 1e-06 | 3 | 5 |" in rows["GeN-SGD"]
    assert "| 35 | never | never |" in rows["GeN-AdaGrad"]
    assert "GeN from every initial lr" in md  # GeN-SGD ran from two η0
    assert "| GeN-SGD | 2 | 0 | 2 | 2 |" in md
    assert str(root / "synthetic.md") in capsys.readouterr().out


def test_report_refuses_a_dir_without_runs(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err
