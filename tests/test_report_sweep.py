"""`genrun-report` on a sweep no paper table covers: one row per combination of what varied."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from genrun.report import main
from genrun.report.runs import load_runs
from genrun.report.sweep import split_of, varying


def _fake_run(root: Path, num: int, overrides: list[str], status: str, final: dict, lr: float = 0.1,
              wall: float = 2.0, commit: str = "0123456789ab", cfg: dict | None = None,
              choices: dict | None = None) -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"task": {"name": "digits"}, **(cfg or {})})))
    if choices is not None:
        (run / ".hydra" / "hydra.yaml").write_text(OmegaConf.to_yaml({"hydra": {"runtime": {"choices": choices}}}))
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run / "summary.json").write_text(json.dumps({"status": status, "final": final, "lr": [lr, lr],
                                                  "wall_time_s": wall, "versions": {"genrun_commit": commit}}))
    records = [{"kind": "train", "step": s, "lr": [lr], "loss": 2.0 / s} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _sweep(root: Path) -> Path:
    num = 0
    for optim in ("sgd", "gen_sgd"):
        for seed, acc in zip((0, 1, 2), (0.90, 0.94, 0.92)):
            diverged = optim == "sgd" and seed == 2
            final = {} if diverged else {"val": {"acc": acc - 0.1}, "test": {"acc": acc, "loss": 0.3}}
            _fake_run(root, num, [f"optim={optim}", f"seed={seed}", "trainer.max_steps=5", "trainer.progress=off"],
                      "diverged" if diverged else "finished", final, lr=0.05 if optim == "sgd" else 0.2)
            num += 1
    return root


def test_rows_are_what_varied_and_cells_average_finished_seeds(tmp_path, capsys):
    root = _sweep(tmp_path)
    runs = load_runs(root)
    assert [r.path.name for r in runs] == [str(i) for i in range(6)]
    assert varying(runs) == ["optim"] and split_of(runs) == "test"

    assert main([str(root)]) == 0
    md = (root / "sweep.md").read_text()
    assert "| row | seeds | acc | loss | final lr | wall time (s) |" in md
    assert "| optim=sgd | 2 (1 diverged) | 0.9200 ±0.0200 | 0.3000 ±0.0000 | 0.05 | 2.0 ±0.0 |" in md
    assert "| optim=gen_sgd | 3 | 0.9200 ±0.0200 | 0.3000 ±0.0000 | 0.2 | 2.0 ±0.0 |" in md
    assert (root / "sweep_curves.png").stat().st_size > 10_000
    out = capsys.readouterr()
    assert str(root / "sweep.md") in out.out and "commits" not in out.err  # one code version: nothing to say


def test_runs_of_different_code_are_pointed_out(tmp_path, capsys):
    for num, commit in enumerate(("aaaaaaaaaaaa", "bbbbbbbbbbbb-dirty", "aaaaaaaaaaaa")):
        _fake_run(tmp_path, num, [f"seed={num}"], "finished", {"test": {"acc": 0.9}}, commit=commit)
    assert main([str(tmp_path)]) == 0
    assert ("genrun-report: note: these runs come from 2 genrun commits (aaaaaaaaaaaa, bbbbbbbbbbbb-dirty)"
            in capsys.readouterr().err)


def test_a_sweep_over_seeds_only_is_one_row_and_job_ten_comes_after_job_two(tmp_path):
    for num in range(11):
        _fake_run(tmp_path, num, [f"seed={num}"], "finished", {"dev": {"acc": 0.5 + num / 100}})
    runs = load_runs(tmp_path)
    assert [r.path.name for r in runs] == [str(i) for i in range(11)]
    assert varying(runs) == [] and split_of(runs) == "dev"
    assert main([str(tmp_path)]) == 0
    assert "| all runs | 11 | 0.5500 ±0.0500 |" in (tmp_path / "sweep.md").read_text()


def test_a_truncated_summary_or_a_cut_off_line_skips_that_run_or_line_and_says_so(tmp_path, capsys):
    _sweep(tmp_path)
    (tmp_path / "1" / "summary.json").write_text('{"status": "fini')  # a full disk, a kill mid-write
    with open(tmp_path / "0" / "metrics.jsonl", "a") as f:  # the row's first run: its curve is drawn
        f.write('{"kind": "train", "st')
    assert main([str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"genrun-report: note: skipped {tmp_path / '1'}: JSONDecodeError reading it (" in err
    assert f"genrun-report: note: skipped 1 unreadable line(s) of {tmp_path / '0' / 'metrics.jsonl'}" in err
    assert "| optim=sgd | 1 (1 diverged) |" in (tmp_path / "sweep.md").read_text()  # seeds 0 and 2 of 0, 1, 2


def test_killed_and_running_runs_are_listed_as_unfinished(tmp_path, capsys):
    from genrun import rundir

    _sweep(tmp_path)
    for num in (2, 5):
        (tmp_path / str(num) / "summary.json").unlink()  # killed (kill -9, the machine lost) before the end
    held = rundir.claim(tmp_path / "5", key="hydra.run.dir")  # as a genrun still training it holds it
    try:
        assert main([str(tmp_path)]) == 0
    finally:
        held.release()
    err = capsys.readouterr().err
    assert (f"genrun-report: note: unfinished run {tmp_path / '2'} (no summary.json: killed, or stopped by a crash); "
            "not in the tables") in err
    assert f"genrun-report: note: unfinished run {tmp_path / '5'} (still running); not in the tables" in err
    for num in range(6):
        (tmp_path / str(num) / "summary.json").unlink(missing_ok=True)
    assert main([str(tmp_path)]) == 2
    assert "genrun-report: error: no runs (dirs with summary.json)" in capsys.readouterr().err


def _two_sweeps(tmp_path: Path) -> tuple[Path, Path]:
    """A: optim=sgd,gen_sgd; B: gen_sgd with the next-batch probe, a key A never named."""
    a, b = tmp_path / "a", tmp_path / "b"
    gen = {"optim": {"gen": {"probe": "same"}}}
    for num, (optim, acc) in enumerate((("sgd", 0.90), ("gen_sgd", 0.95))):
        _fake_run(a, num, [f"optim={optim}"], "finished", {"test": {"acc": acc}},
                  cfg=gen if optim == "gen_sgd" else {"optim": {}}, choices={"optim": optim, "task": "digits"})
    _fake_run(b, 0, ["optim.gen.probe=next"], "finished", {"test": {"acc": 0.97}},
              cfg={"optim": {"gen": {"probe": "next"}}}, choices={"optim": "gen_sgd", "task": "digits"})
    return a, b


def test_several_sweep_dirs_make_one_table_labelled_by_what_differs(tmp_path, monkeypatch, capsys):
    a, b = _two_sweeps(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b)]) == 0
    md = (tmp_path / "genrun-report" / "sweep.md").read_text()  # several dirs: into ./genrun-report
    assert md.startswith(f"# 3 runs under {tmp_path}")
    assert "| optim=sgd, optim.gen.probe=- | 1 | 0.9000 |" in md
    assert "| optim=gen_sgd, optim.gen.probe=same | 1 | 0.9500 |" in md
    assert "| optim=gen_sgd, optim.gen.probe=next | 1 | 0.9700 |" in md
    assert not (a / "sweep.md").exists() and not (b / "sweep.md").exists()


def test_links_to_runs_are_followed_and_each_run_counts_once(tmp_path):
    a, b = _two_sweeps(tmp_path)
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "gen").symlink_to(a / "1")
    (picked / "next").symlink_to(b / "0")
    (picked / "again").symlink_to(b / "0")  # the same run by two names
    (picked / "loop").symlink_to(picked)  # a link back up the tree must not hang the walk
    assert [r.path.name for r in load_runs(picked)] == ["again", "gen"]
    assert main([str(picked), str(b), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert md.startswith("# 2 runs under ")
    assert "| optim.gen.probe=same |" in md and "| optim.gen.probe=next |" in md


def test_a_report_of_one_run_is_titled_by_the_run(tmp_path):
    _fake_run(tmp_path, 7, ["seed=0"], "finished", {"test": {"acc": 0.9}})
    assert main([str(tmp_path / "7")]) == 0
    assert (tmp_path / "7" / "sweep.md").read_text().startswith("# Run 7\n")
