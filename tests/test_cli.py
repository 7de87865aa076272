"""`genrun` end to end, as a user runs it: from a directory outside the repo, in subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import GENRUN, PATIENCE, ROOT
from genrun import __version__ as genrun_version
from genrun.gen import GUARD_RULES

FAST = ["+experiment=fast", "trainer.progress=off"]


def no_run_dirs(root: Path) -> bool:
    """Nothing but (at most) empty folders under outputs/: no run dir was left behind."""
    return not [p for p in (root / "outputs").rglob("*") if p.is_file() or p.name == ".hydra"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_run_trains_digits_with_gen_sgd_to_95_percent(genrun, tmp_path):
    proc = genrun("trainer.progress=off")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["final"]["test"]["acc"] >= 0.95
    assert summary["gen"]["probes"] > 0 and summary["gen"]["accepted"] > 0
    assert summary["wall_time_s"] > 0 and summary["peak_memory_mb"] > 0
    assert summary["versions"]["genrun"] == genrun_version and summary["versions"]["torch"] == torch.__version__
    for name in ("metrics.jsonl", "gen.jsonl", "ckpt.pt", "metrics.csv", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert (run_dir / name).exists(), name
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, summary["step"] + 1))
    assert all(len(r["lr"]) == 2 for r in train)  # weights and no-decay group
    assert evals[-1]["split"] == "test" and evals[-1]["acc"] == summary["final"]["test"]["acc"]
    probes = read_jsonl(run_dir / "gen.jsonl")
    assert len(probes) == summary["gen"]["probes"]
    assert {"step", "lr_before", "lr_after", "eta_star", "A", "b", "r2", "accepted"} <= set(probes[0])
    assert set(GUARD_RULES) <= set(probes[0])  # one flag per guard rule in every record
    # the printed summary names the test accuracy, the final lr, the wall time and the run dir
    out = proc.stdout
    assert "acc" in out and "final lr" in out and str(run_dir.name) in out


def test_overrides_pick_groups_and_keys(genrun, tmp_path):
    run_dir = tmp_path / "run"
    proc = genrun("task=digits", "optim=sgd", "sched=cosine", "optim.lr=0.05", "seed=3", *FAST,
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["gen"] is None and summary["step"] == 20
    lrs = [r["lr"][0] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert lrs[0] < 0.05 and lrs == sorted(lrs, reverse=True)  # cosine decay from 0.05
    assert not (run_dir / "gen.jsonl").exists() or not (run_dir / "gen.jsonl").read_text()


def test_version_names_genrun_its_commit_and_the_libraries(genrun):
    import subprocess

    proc = genrun("--version")
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1
    assert proc.stdout.startswith(f"genrun {genrun_version}")
    assert f"torch {torch.__version__.split('+')[0]}" in proc.stdout
    if (ROOT / ".git").exists():  # a checkout: the commit it runs, as a bug report needs
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert f"(commit {head}" in proc.stdout
    report = subprocess.run([str(GENRUN.with_name("genrun-report")), "--version"], capture_output=True, text=True)
    assert report.returncode == 0 and report.stdout.startswith("genrun-report ") and report.stdout.count("\n") == 1


def test_cfg_job_prints_the_resolved_config(genrun):
    proc = genrun("--cfg", "job", "optim=adamw", "optim.lr=0.003")
    assert proc.returncode == 0, proc.stderr
    assert "name: adamw" in proc.stdout and "lr: 0.003" in proc.stdout
    assert "num_classes: 10" in proc.stdout  # interpolations resolved


def test_help_lists_groups_and_options(genrun):
    proc = genrun("--help")
    assert proc.returncode == 0
    for line in ("optim: ", "sched: ", "task: ", "logger: ", "trainer: ", "experiment: "):
        assert line in proc.stdout
    assert "gen_sgd" in proc.stdout and "warmup_cosine" in proc.stdout


def test_unknown_group_option_names_the_valid_ones(genrun, tmp_path):
    proc = genrun("task=cifar1O")
    assert proc.returncode != 0
    assert "cifar10" in proc.stderr and "digits" in proc.stderr
    assert no_run_dirs(tmp_path)


@pytest.mark.parametrize(
    "override",
    ["optim.gen.every=0", "optim.gen.smoothing=1.5", "trainer.batch_size=-1", "optim.gen.horizon=bogus",
     "trainer.threads=0", "trainer.average=-1", "trainer.devices=0", "trainer.ddp_find_unused=maybe",
     "trainer.num_workers=many", "optim.lr=inf", "optim.gen.points=[-1,nan,1]"],
)
def test_invalid_values_fail_in_one_line_without_a_run_dir(genrun, tmp_path, override):
    proc = genrun(override)
    key = override.split("=")[0]
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"genrun: error: {key}=") and "must be" in lines[0]
    assert "Traceback" not in proc.stderr
    assert no_run_dirs(tmp_path)


def test_a_failed_start_removes_only_the_folders_it_made(genrun, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for bad in ("optim.gen.every=0", "task=cifar10"):  # found before Hydra writes / while building the task
        assert genrun(bad, f"task.data_dir={tmp_path / 'none'}", f"hydra.run.dir={mine / 'run'}").returncode == 2
        assert mine.is_dir() and not any(mine.iterdir())  # the user's empty folder stays
    assert genrun("task=cifar10", f"task.data_dir={tmp_path / 'none'}").returncode == 2
    assert not (tmp_path / "outputs").exists()  # outputs/<date>/<time>: all three levels were made, all go


def test_missing_dataset_names_the_path_and_the_flag(genrun, tmp_path):
    proc = genrun("task=cifar10", f"task.data_dir={tmp_path / 'nowhere'}")
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in proc.stderr
    assert "task.download=true" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("content", ["garbage", "foreign"])
def test_bad_checkpoint_is_a_clear_error(genrun, tmp_path, content):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    if content == "garbage":
        (run_dir / "ckpt.pt").write_bytes(b"this is not a checkpoint")
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, run_dir / "ckpt.pt")
    proc = genrun(f"trainer.resume={run_dir}", *FAST)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("genrun: error: trainer.resume:") and str(run_dir / "ckpt.pt") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "ckpt.pt").exists()  # a user's file is never removed


def test_checkpoint_of_another_model_is_a_clear_error(genrun, tmp_path):
    run_dir = tmp_path / "run"
    assert genrun("trainer.max_steps=3", "trainer.progress=off", f"hydra.run.dir={run_dir}").returncode == 0
    proc = genrun(f"trainer.resume={run_dir}", "model.width=8", "trainer.max_steps=6")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("genrun: error: trainer.resume:") and "does not fit" in proc.stderr
    assert "Traceback" not in proc.stderr and (run_dir / "ckpt.pt").exists()


def test_divergence_stops_cleanly_and_keeps_the_last_good_checkpoint(genrun, tmp_path):
    run_dir = tmp_path / "run"
    proc = genrun("optim=sgd", "optim.lr=3.0", "optim.momentum=0.99", "trainer.ckpt_every=1", "trainer.progress=off",
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert f"at step {summary['step'] + 1}" in summary["message"] and "Traceback" not in proc.stderr
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert 0 < ckpt["step"] <= summary["step"]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_sweep_runs_every_combination(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "optim=sgd,gen_sgd", "sched=constant,cosine", *FAST, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    overrides = {tuple((job / ".hydra" / "overrides.yaml").read_text().split()) for job in jobs}
    assert len(overrides) == 4
    assert all(json.loads((job / "summary.json").read_text())["status"] == "finished" for job in jobs)


def test_joblib_launcher_runs_a_sweep_in_parallel_processes(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *FAST,
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert all(s["status"] == "finished" for s in summaries)
    assert summaries[0]["final"] != summaries[1]["final"]  # different seeds, different runs


def test_wandb_logger_writes_an_offline_run_in_the_run_dir(genrun, tmp_path):
    run_dir = tmp_path / "run"
    proc = genrun("logger=wandb", *FAST, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(offline.glob("*.wandb"))


@pytest.mark.parametrize("logger, csv", [("csv", True), ("none", False)])
def test_csv_and_none_loggers(genrun, tmp_path, logger, csv):
    run_dir = tmp_path / "run"
    proc = genrun(f"logger={logger}", "trainer.max_steps=5", "trainer.progress=off", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "metrics.csv").exists() == csv
    assert (run_dir / "metrics.jsonl").exists() and not (run_dir / "wandb").exists()


@pytest.mark.parametrize("min_r2, warned", [(1.0, True), (0.99, False)])
def test_a_run_where_gen_rejects_nearly_every_probe_says_so(compose_cfg, tmp_path, min_r2, warned):
    from genrun.engine import train

    # R² = 1 exactly never happens with the slope taken from the gradient: every probe is rejected
    cfg = compose_cfg(["logger=none", "trainer.max_steps=24", "trainer.progress=off", "optim.gen.every=1",
                       f"optim.gen.min_r2={min_r2}"])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["gen"]["probes"] == 24
    warning = summary["warning"] or ""
    assert ("GeN accepted" in warning) == warned, warning
    if warned:
        assert f"GeN accepted {summary['gen']['accepted']} of 24 probes (latest rejections: r2 " in warning


@pytest.mark.parametrize("threads", [None, 1])
def test_trainer_threads_sets_torch_threads_only_when_given(compose_cfg, tmp_path, monkeypatch, threads):
    import torch

    from genrun.engine import train

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # the real call would leak into later tests
    cfg = compose_cfg(["logger=none", "trainer.max_steps=2", "trainer.progress=off", "trainer.device=cpu",
                       f"trainer.threads={'null' if threads is None else threads}"])
    assert train(cfg, tmp_path)["status"] == "finished"
    assert calls == ([] if threads is None else [threads])


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["trainer.max_epochs=3"], "trainer.max_epochs is not a key of this config; did you mean trainer.epochs?"),
        (["seeed=1"], "seeed is not a key of this config; did you mean seed?"),
        (["optim=sgd", "optim.gen.every=3"], "optim.gen.every is not a key of this config: it has no optim.gen"),
        (["hydra.job.nam=x"], "hydra.job.nam is not a key of this config; did you mean hydra.job.name?"),
        (["+trainer.epochs=3"], "trainer.epochs already exists: set it without the +"),
        (["task=cifar1000"], "task=cifar1000 is not an option of task; did you mean task=cifar100? (options: beale,"),
        (["optim/gen=algorthm1"],
         "optim/gen=algorthm1 is not an option of optim/gen; did you mean optim/gen=algorithm1? "
                              "(options: algorithm1, default, fast)"),
        (["+experiment=tabel2"], "experiment=tabel2 is not an option of experiment; did you mean experiment=table2?"),
        (["optim.lr=[1"], "cannot read the override 'optim.lr=[1': no viable alternative at input '[1'"),
        (["trainer.epochs"], "cannot read the override 'trainer.epochs': missing EQUAL"),
    ],
)
def test_hydra_composition_errors_read_as_one_line_with_the_closest_name(overrides, line):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from genrun import CONF_DIR
    from genrun.overrides import COMPOSITION_ERRORS, explain

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), pytest.raises(COMPOSITION_ERRORS) as err:
        compose(config_name="config", overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    message = explain(err.value, overrides)
    assert message.startswith(line) and "\n" not in message, message


def test_a_typo_in_a_key_is_one_line_and_leaves_no_run_or_sweep_dir(genrun, tmp_path):
    proc = genrun("trainer.max_epochs=3")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "genrun: error: trainer.max_epochs is not a key of this config; did you mean trainer.epochs? "
        "(`genrun --cfg job` prints every key)"]
    # Hydra writes the sweep's multirun.yaml before it composes the jobs
    proc = genrun("-m", "seed=0,1", "optim.gen.evry=1")
    assert proc.returncode == 2 and "did you mean optim.gen.every?" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
    # a bad value in the sweep's first job: its dir and the sweep's go
    proc = genrun("-m", "seed=0,1", "optim.gen.every=0", "hydra.sweep.dir=sweep")
    assert proc.returncode == 2 and not (tmp_path / "sweep").exists()


def test_hydra_full_error_keeps_hydras_own_traceback(genrun, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    proc = genrun("trainer.max_epochs=3")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigCompositionException" in proc.stderr


def test_two_hydra_modes_at_once_is_a_one_line_error(genrun):
    proc = genrun("-m", "--info")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "genrun: error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified"]


def test_engine_streams_every_gen_record_even_with_a_short_history(compose_cfg, tmp_path):
    from genrun.engine import train

    cfg = compose_cfg(["logger=none", "trainer.max_steps=12", "trainer.progress=off", "trainer.device=cpu",
                       "optim.gen.every=1", "optim.gen.history_size=2"])
    summary = train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(12))
    assert summary["gen"]["probes"] == 12 and summary["gen"]["accepted"] == sum(r["accepted"] for r in records)


def test_a_run_that_ends_at_chance_finishes_with_a_warning(genrun, tmp_path):
    dead, alive = tmp_path / "dead", tmp_path / "alive"
    # one step at a vanishing lr leaves the random network, which guesses one class
    proc = genrun("optim=sgd", "optim.lr=1e-12", "trainer.max_steps=1", "trainer.progress=off", "logger=none",
                  f"hydra.run.dir={dead}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((dead / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["warning"].startswith("test accuracy ")
    assert "at chance (10 classes)" in summary["warning"]
    assert f"warning: {summary['warning']}" in proc.stdout
    proc = genrun(*FAST, "logger=none", f"hydra.run.dir={alive}")
    assert proc.returncode == 0 and "warning:" not in proc.stdout
    assert json.loads((alive / "summary.json").read_text())["warning"] is None


def test_classification_diagnose_uses_the_chance_rule():
    from genrun.tasks.base import ClassificationTask

    task = ClassificationTask()
    task.num_classes = 10
    assert task.diagnose({"test": {"acc": 0.15, "loss": 2.3}}).startswith("test accuracy 15.0 %")
    assert task.diagnose({"test": {"acc": 0.151}}) is None and task.diagnose({}) is None
    assert task.diagnose({"val": {"loss": 2.3}}) is None  # no accuracy, nothing to judge


def test_package_info_chatter_stays_out_of_the_run_log(genrun, tmp_path):
    # dog-optimizer logs every state_dict() call at INFO: one line per checkpoint without the config's quieting
    run_dir = tmp_path / "run"
    proc = genrun("optim=dog", "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.progress=off", "logger=none",
                  f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "ckpt.pt").exists()
    assert "retrieving DoG state dict" not in (run_dir / "genrun.log").read_text() + proc.stdout + proc.stderr


def test_a_sweep_over_task_families_trains_each_with_its_own_model(genrun, tmp_path):
    shown = genrun("task=rosenbrock", "--cfg", "job")
    assert "_target_: genrun.tasks.synthetic.Point" in shown.stdout, shown.stderr
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "task=digits,rosenbrock", *FAST, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    finals = [json.loads((sweep / str(i) / "summary.json").read_text())["final"]["test"] for i in (0, 1)]
    assert "acc" in finals[0] and "objective" in finals[1]


def test_a_users_task_without_a_model_is_a_one_line_error_naming_the_fitting_ones(genrun, tmp_path):
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "bowl.yaml").write_text(
        "_target_: genrun.tasks.synthetic.Rosenbrock\nname: bowl\nstart: [0.0, 0.0]\niterations: 10\n")
    proc = genrun(f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "task=bowl", *FAST,
                  f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "model: task=bowl names no model" in proc.stderr and "point" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = genrun(f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "task=bowl", "model=point", *FAST,
                  f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2 and "add one with +model=NAME" in proc.stderr, proc.stderr
    proc = genrun(f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "task=bowl", "+model=point", *FAST,
                  f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr


def test_a_failed_sweep_job_does_not_stop_the_others_and_the_report_counts_it(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "task=cifar10,mnist5k", "model=small_cnn", f"task.data_dir={tmp_path / 'none'}", *FAST,
                  f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr
    assert "genrun: error: job 0: task.data_dir: no CIFAR-10" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"`genrun-report {sweep}` lists each job's status")
    failed, ran = (json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1))
    assert failed["status"] == "failed" and "no CIFAR-10" in failed["message"] and ran["status"] == "finished"
    report = subprocess.run([sys.executable, "-m", "genrun.report", str(sweep)], capture_output=True, text=True,
                            timeout=PATIENCE)
    assert report.returncode == 0, report.stderr
    rows = (sweep / "sweep.md").read_text()
    assert "| task=cifar10 | 0 (1 failed) |" in rows and "| task=mnist5k | 1 |" in rows


def test_submitit_launcher_runs_each_job_as_a_job_of_its_own_and_a_failure_stays_in_its_job(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=30", "task=cifar10,mnist5k",
                  "model=small_cnn", f"task.data_dir={tmp_path / 'none'}", *FAST, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("genrun: error: job 0 failed: task.data_dir: no CIFAR-10")
    failed, ran = (json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1))
    assert failed["status"] == "failed" and ran["status"] == "finished"
    assert (sweep / ".submitit").is_dir()  # submitit's own job records: these ran as its jobs
    report = subprocess.run([sys.executable, "-m", "genrun.report", str(sweep)], capture_output=True, text=True,
                            timeout=PATIENCE)
    assert report.returncode == 0 and "| task=cifar10 | 0 (1 failed) |" in (sweep / "sweep.md").read_text()


def test_off_a_terminal_progress_is_a_few_plain_lines_and_the_run_log_keeps_what_was_shown(genrun, tmp_path):
    run_dir = tmp_path / "run"
    proc = genrun("trainer.epochs=2", "logger=none", f"hydra.run.dir={run_dir}")  # output to a pipe, as in a SLURM log
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("genrun: step ")]
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("genrun: step 46/46 (100%), epoch 1, loss ")
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr and "step/s]" not in proc.stderr  # no tqdm bar
    log = (run_dir / "genrun.log").read_text()
    assert "genrun: finished after 46 steps" in log and f"run dir: {run_dir}" in log and lines[-1] in log
    bar = genrun("trainer.max_steps=3", "logger=none", "trainer.progress=on", f"hydra.run.dir={tmp_path}/bar")
    assert "train: 100%" in bar.stderr and "genrun: step " not in bar.stderr
