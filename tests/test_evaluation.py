"""Evaluation controls (when, which splits, how much of each), saved predictions and wall-clock time.

The runs are real and small: digits for the schedule of evaluations, and the NLG tests' tiny GPT-2
on the synthetic restaurants for splits, limits, decoded texts and resume.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import GENRUN, scored_in_shares
from genrun.errors import UserError
from genrun.evaluation import check_splits
from genrun.tasks.base import Head, Task
from genrun.tasks.nlg import SyntheticE2E
from genrun.text_models import CausalLM
from test_nlg import COCO_FREE, ROWS, tiny_gpt2  # noqa: F401 - a fixture, used as an argument

QUIET = ["trainer.progress=off", "logger=none"]


def _records(run_dir, kind=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _nlg(tiny_gpt2, *extra: str) -> list[str]:
    """A GPT-2 of the fixture's vocabulary on 8 training and 5 evaluation MRs (4 references each)."""
    return ["task=synthetic_e2e", "model=gpt2_tiny", f"model.tokenizer={tiny_gpt2}", "model.width=32",
            "task.train_mrs=8", "task.eval_mrs=5", "task.max_new_tokens=6", "task.max_length=64",
            f"task.metrics={COCO_FREE}".replace("'", ""), "optim=adamw", "trainer.batch_size=4", *QUIET, *extra]


# -- when and what is evaluated ---------------------------------------------------------------------


def test_without_epoch_evaluations_only_eval_every_and_the_end_evaluate(genrun, tmp_path):
    # digits: 23 steps an epoch, so 30 steps cross one epoch's end (checkpointed, not evaluated)
    run = tmp_path / "run"
    proc = genrun("trainer.max_steps=30", "trainer.eval_every=10", "trainer.eval_epochs=false",
                  "trainer.eval_limit=50", *QUIET, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    evals = _records(run, "eval")
    assert [(r["step"], r["eval_n"]) for r in evals] == [(10, 50), (20, 50), (30, 360)]  # the end: whole
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 30
    final = json.loads((run / "summary.json").read_text())["final"]
    assert final["test"]["acc"] == evals[-1]["acc"]
    times = [r["time_s"] for r in _records(run)]
    assert times == sorted(times) and times[-1] > times[0] and all(r["eval_s"] >= 0 for r in evals)


def test_each_epoch_evaluates_by_default(genrun, tmp_path):
    run = tmp_path / "run"
    proc = genrun("trainer.max_steps=30", *QUIET, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert [(r["step"], r["eval_n"]) for r in _records(run, "eval")] == [(23, 360), (30, 360)]


def test_training_scores_the_chosen_splits_cut_and_the_end_every_split_whole(genrun, tmp_path, tiny_gpt2):
    run = tmp_path / "run"
    # eval_limit=6: the first 6 (MR, reference) pairs, i.e. the first 2 MRs of 4 references each
    proc = genrun(*_nlg(tiny_gpt2, "trainer.max_steps=3", "trainer.eval_every=1", "trainer.eval_splits=[dev]",
                        "trainer.eval_limit=6"), f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    evals = _records(run, "eval")
    assert [(r["step"], r["split"], r["eval_n"]) for r in evals] == [
        (1, "dev", 6), (2, "dev", 6), (3, "dev", 20), (3, "test", 20)]
    final = json.loads((run / "summary.json").read_text())["final"]
    assert set(final) == {"dev", "test"} and final["dev"]["loss"] == evals[2]["loss"] != evals[1]["loss"]

    predictions = run / "predictions"
    assert sorted(p.name for p in predictions.iterdir()) == [
        "dev_step1.jsonl", "dev_step2.jsonl", "dev_step3.jsonl", "test_step3.jsonl"]
    cut = [json.loads(line) for line in (predictions / "dev_step1.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (predictions / "dev_step3.jsonl").read_text().splitlines()]
    assert len(cut) == 2 and len(whole) == 5 and [r["mr"] for r in cut] == [r["mr"] for r in whole[:2]]
    for row in whole:
        assert set(row) == {"mr", "prediction", "references"} and len(row["references"]) == 4
        assert row["mr"].startswith("name[") and isinstance(row["prediction"], str)
        name = row["mr"][len("name["):row["mr"].index("]")]
        assert all(ref.startswith(name) for ref in row["references"])  # each MR with its own references


def test_an_unknown_split_names_the_tasks_splits(genrun, tmp_path):
    proc = genrun("trainer.eval_splits=[dev]", *QUIET, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "trainer.eval_splits: the task has no split 'dev' (its splits: test)" in proc.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"no split 'val' \(its splits: dev, test\)"):
        check_splits(["dev", "val"], {"dev": [], "test": []})
    assert check_splits(None, {"dev": [], "test": []}) == ["dev", "test"]


# -- the cut, in one process and in shares ------------------------------------------------------------


def test_the_generic_cut_serves_the_first_items_and_the_splits_attributes():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    data.collate = "the split's"
    head = Task().head(data, 4)
    assert isinstance(head, Head) and len(head) == 4 and [float(head[i][0]) for i in range(4)] == [0, 1, 2, 3]
    assert head.collate == "the split's" and float(head[-1][0]) == 3.0
    with pytest.raises(IndexError):
        head[4]
    assert Task().head(data, 10) is data
    import pickle

    assert len(pickle.loads(pickle.dumps(head))) == 4  # DataLoader workers may receive it pickled


def test_a_cut_text_split_decodes_only_its_mrs_and_shares_score_it_as_one_process(tiny_gpt2):
    task = SyntheticE2E(str(tiny_gpt2), metrics=COCO_FREE, max_new_tokens=6)
    torch.manual_seed(0)
    model = CausalLM(64, 6, pretrained=str(tiny_gpt2)).eval()
    data = task.encode(ROWS + [(f"name[Spot {i}]", f"Spot {i} is a place.") for i in range(4)])
    head = task.head(data, 4)  # ROWS' first 4 pairs: MR 0 (2 references) and MR 1 (2 of its 3)
    assert len(head) == 4 and head.mrs == data.mrs[:2] and head.groups == data.groups[:2]
    assert head.groups[1][1] == data.groups[1][1] and len(head.groups[1][1]) == 3  # scored against all its references
    shared, whole = scored_in_shares(task, model, head, count=3)
    assert shared == pytest.approx(whole, rel=1e-6)
    parts = [task.predict(model, DataLoader(head, batch_size=4, collate_fn=data.collate), lambda b: b)]
    rows = task.examples(parts)
    assert [r["mr"] for r in rows] == data.mrs[:2] and rows[1]["references"] == data.groups[1][1]
    assert Task().examples(parts) == []  # a task that decodes nothing saves nothing


# -- resume: later predictions dropped, the clock counts on ------------------------------------------

KILL_AFTER_STEP_3 = """
import os, signal
from genrun import engine
keep = engine.Records.examples
def examples(self, at, split, rows):
    keep(self, at, split, rows)
    if at.step == 3:
        os.kill(os.getpid(), signal.SIGKILL)
engine.Records.examples = examples
"""


def test_resume_drops_predictions_after_its_checkpoint_and_its_clock_counts_on(genrun, tmp_path, tiny_gpt2):
    run = tmp_path / "run"
    args = _nlg(tiny_gpt2, "trainer.max_steps=4", "trainer.eval_every=1", "trainer.ckpt_every=2")
    killed = genrun(*args, f"hydra.run.dir={run}", python=KILL_AFTER_STEP_3)
    assert killed.returncode == -9, killed.stderr
    assert (run / "predictions" / "dev_step3.jsonl").exists()
    elapsed = torch.load(run / "ckpt.pt", weights_only=True)["elapsed_s"]
    assert elapsed > 0

    # evaluating every 2 steps now: step 3 is not evaluated again, so its file must be gone (run
    # without the fixture's check that no file disappears: dropping this one is the point)
    proc = subprocess.run([str(GENRUN), f"trainer.resume={run}", "trainer.eval_every=2"], cwd=tmp_path,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run / "predictions").iterdir()) == [
        "dev_step1.jsonl", "dev_step2.jsonl", "dev_step4.jsonl", "test_step1.jsonl", "test_step2.jsonl",
        "test_step4.jsonl"]
    records = _records(run)
    assert max(r["step"] for r in records) == 4 and not [r for r in records if r["step"] == 3 and r["kind"] == "eval"]
    times = [r["time_s"] for r in records]
    assert times == sorted(times)
    assert all(r["time_s"] > elapsed for r in records if r["step"] > 2)  # on from the checkpoint, not from 0


def test_a_checkpoint_without_elapsed_time_resumes_with_the_clock_from_zero(genrun, tmp_path):
    run = tmp_path / "run"
    assert genrun("trainer.max_steps=3", *QUIET, f"hydra.run.dir={run}").returncode == 0
    state = torch.load(run / "ckpt.pt", weights_only=True)
    del state["elapsed_s"]  # as checkpoints written before the clock was kept
    torch.save(state, run / "ckpt.pt")
    proc = genrun(f"trainer.resume={run}", "trainer.max_steps=4")
    assert proc.returncode == 0, proc.stderr
    (last,) = [r for r in _records(run, "train") if r["step"] == 4]
    assert 0 <= last["time_s"] < torch.load(run / "ckpt.pt", weights_only=True)["elapsed_s"]
