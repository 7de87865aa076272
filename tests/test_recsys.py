"""Sequential recommendation: MovieLens-1M's reader, BERT4Rec's protocol and metrics, the model, runs."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import GENRUN, options
from genrun.errors import DataMissing, UserError
from genrun.models import BERT4Rec
from genrun.report import table7
from genrun.tasks.recsys import (
    ClozeSequences,
    MovieLens1M,
    RankingSet,
    SyntheticSequences,
    popularity_negatives,
    ranking_metrics,
)


def write_ratings(root, rows) -> None:
    """`rows` of (user, movie, rating, timestamp) as GroupLens publishes them: ml-1m/ratings.dat."""
    (root / "ml-1m").mkdir(parents=True, exist_ok=True)
    text = "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in rows)
    (root / "ml-1m" / "ratings.dat").write_bytes(text.encode("latin-1"))


def fixture_rows(users: int = 12, movies: int = 30, per_user: int = 8, seed: int = 0) -> list[tuple]:
    """Every one of `movies` sparse movie ids rated by someone; random ratings and times."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        for j in range(per_user):
            movie = 70 + 7 * ((u * per_user + j) % movies)
            rows.append((u + 1, movie, int(rng.integers(1, 6)), int(rng.integers(9.7e8, 9.8e8))))
    return rows


# -- MovieLens-1M, read as published ------------------------------------------------------------


def test_movielens_orders_by_time_renumbers_movies_and_drops_short_users(tmp_path):
    write_ratings(tmp_path, [
        (1, 50, 5, 300), (1, 20, 3, 100), (1, 70, 4, 200), (1, 90, 1, 200), (1, 20, 2, 400),  # 90 after 70: file order
        (2, 70, 5, 10), (2, 50, 5, 20), (2, 30, 5, 30),
        (3, 20, 5, 1), (3, 50, 5, 2),  # 2 ratings < min_user=3: dropped with its movies' counts
    ])
    task = MovieLens1M(data_dir=str(tmp_path), num_items=5, min_user=3)
    # movies 20, 30, 50, 70, 90 -> items 1..5; every rating is an interaction, repeats included
    assert [s.tolist() for s in task.sequences()] == [[1, 4, 5, 3, 1], [4, 3, 2]]


def test_movielens_item_count_must_match_the_model_vocabulary(tmp_path):
    write_ratings(tmp_path, fixture_rows())
    with pytest.raises(UserError, match=r"task.num_items=3706 .* set task.num_items=30"):
        MovieLens1M(data_dir=str(tmp_path), num_items=3706).sequences()


def test_movielens_missing_or_malformed_data_is_a_one_line_error(tmp_path):
    with pytest.raises(DataMissing, match=r"ml-1m/ratings.dat; run with task.download=true"):
        MovieLens1M(data_dir=str(tmp_path), num_items=30).sequences()
    (tmp_path / "ml-1m").mkdir()
    (tmp_path / "ml-1m" / "ratings.dat").write_text("UserID,MovieID,Rating\n1,2,3\n")
    with pytest.raises(UserError, match="UserID::MovieID::Rating::Timestamp"):
        MovieLens1M(data_dir=str(tmp_path), num_items=30).sequences()


@pytest.mark.parametrize("key, value", [("max_len", 1), ("negatives", 0), ("num_items", 1), ("mask_prob", 0.0),
                                        ("min_user", 2)])
def test_bad_task_settings_name_the_key(key, value):
    kwargs = {"num_items": 30, key: value}
    with pytest.raises(UserError, match=f"task.{key}={value}"):
        MovieLens1M(**kwargs)


# -- the protocol: leave-one-out, negatives, Cloze masks ----------------------------------------


def test_leave_one_out_histories_targets_and_candidates(tmp_path):
    write_ratings(tmp_path, fixture_rows())
    task = MovieLens1M(data_dir=str(tmp_path), num_items=30, max_len=6, negatives=5)
    seqs = task.sequences()
    train, evals = task.datasets()
    mask = task.mask_token
    assert mask == 31 and len(train) == len(evals["val"]) == len(evals["test"]) == 12
    for u, seq in enumerate(seqs):
        tokens, candidates = evals["val"][u]
        assert candidates[0] == seq[-2] and tokens[-1] == mask and tokens[:-1].tolist() == seq[-7:-2].tolist()
        tokens, candidates = evals["test"][u]
        assert candidates[0] == seq[-1] and tokens[:-1].tolist() == seq[-6:-1].tolist()  # sees the val item
    short = RankingSet([np.array([4, 5])], np.array([6]), np.array([[7, 8]]), max_len=6, mask_token=mask)
    assert short[0][0].tolist() == [0, 0, 0, 4, 5, mask]  # left-padded with 0


def test_negatives_are_unseen_distinct_fixed_by_the_seed_and_follow_popularity():
    rng = np.random.default_rng(1)
    # item 1 is everyone's favourite except the users who already saw it
    seqs = [np.array([1, *rng.choice(np.arange(2, 41), size=4, replace=False)]) for _ in range(300)]
    seqs += [np.array([1] * 20) for _ in range(300)]
    neg = popularity_negatives(seqs, 60, 10, seed=0)
    assert neg.shape == (600, 10)
    for seq, row in zip(seqs, neg):
        assert len(set(row.tolist())) == 10 and not set(row.tolist()) & set(seq.tolist())
    assert np.array_equal(neg, popularity_negatives(seqs, 60, 10, seed=0))
    assert not np.array_equal(neg, popularity_negatives(seqs, 60, 10, seed=1))
    counts = np.bincount(neg[300:].ravel(), minlength=61)
    assert counts[2:41].mean() > 3 * counts[41:].mean()  # items 2-40 were seen by someone; 41-60 by no one
    with pytest.raises(UserError, match="task.negatives=59"):
        popularity_negatives(seqs, 60, 59, seed=0)


def test_cloze_masks_hide_real_items_at_the_given_rate_and_label_them():
    seqs = [np.arange(1, 41), np.array([3, 4, 5])]
    data = ClozeSequences(seqs, max_len=50, mask_prob=0.2, mask_token=99, seed=7)
    item = torch.cat([torch.zeros(10, dtype=torch.long), torch.arange(1, 41)])
    hidden, masks = [], set()
    for epoch in range(200):
        data.set_epoch(epoch)
        tokens, labels = data[0]
        masked = tokens == 99
        assert torch.equal(labels[masked], item[masked]) and (labels[~masked] == 0).all()
        assert torch.equal(tokens[~masked], item[~masked]) and not masked[:10].any()  # pads stay pads
        hidden.append(masked.sum().item())
        masks.add(tuple(masked.tolist()))
    assert abs(np.mean(hidden) / 40 - 0.2) < 0.02 and len(masks) > 190  # a fresh mask each epoch
    rare = ClozeSequences(seqs, max_len=5, mask_prob=1e-6, mask_token=99)
    tokens, labels = rare[1]
    assert tokens.tolist() == [0, 0, 3, 4, 99] and labels.tolist() == [0, 0, 0, 0, 5]  # at least one hidden


def test_cloze_masks_depend_on_seed_epoch_and_item_only():
    seqs = [np.arange(1, 41)] * 3
    data = ClozeSequences(seqs, max_len=40, mask_prob=0.3, mask_token=99, seed=7)
    data.set_epoch(3)
    first = data[1][0]
    torch.manual_seed(123)  # other random draws in between change nothing
    torch.rand(1000)
    assert torch.equal(data[1][0], first) and torch.equal(data[1][0], first)
    assert not torch.equal(data[2][0], first)  # same items, another user: other masks
    other_seed = ClozeSequences(seqs, max_len=40, mask_prob=0.3, mask_token=99, seed=8)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed[1][0], first)


# -- metrics ------------------------------------------------------------------------------------


def test_ranking_metrics_match_scikit_learn_and_ties_count_against_the_target():
    from sklearn.metrics import ndcg_score

    scores = torch.randn(64, 21, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sums = ranking_metrics(scores, ks=(1, 5, 10))
    relevance = np.zeros((64, 21))
    relevance[:, 0] = 1.0
    for k in (1, 5, 10):
        expected = ndcg_score(relevance, scores.numpy(), k=k) * 64
        assert math.isclose(float(sums[f"ndcg@{k}"]), expected, rel_tol=1e-9)
        rank = (scores[:, 1:] > scores[:, :1]).sum(1)
        assert float(sums[f"recall@{k}"]) == float((rank < k).sum())
    flat = ranking_metrics(torch.ones(8, 21), ks=(1, 10))
    assert all(float(v) == 0.0 for v in flat.values())  # a network that scores alike earns nothing


def test_recsys_diagnose_flags_recall_at_chance():
    task = SyntheticSequences(num_items=50, negatives=100)
    assert "at chance" in task.diagnose({"test": {"recall@10": 0.12}})
    assert task.diagnose({"test": {"recall@10": 0.5}}) is None


# -- the model ----------------------------------------------------------------------------------


def test_bert4rec_shapes_padding_and_limits():
    torch.manual_seed(0)
    model = BERT4Rec(num_items=30, max_len=8, hidden=16, layers=1, heads=2, dropout=0.0).eval()
    tokens = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 31], [1, 2, 3, 4, 5, 6, 7, 31]])
    hidden = model(tokens)
    assert hidden.shape == (2, 8, 16) and model.item_logits(hidden[:, -1]).shape == (2, 30)
    # a padded position is never attended to: whatever the pad embedding holds, real positions read the same
    assert model.items.weight[0].abs().sum() == 0
    with torch.no_grad():
        model.items.weight[0].normal_()
    assert torch.allclose(model(tokens)[0, 3:], hidden[0, 3:], atol=1e-6)
    assert torch.equal(model(tokens)[1], hidden[1])  # (row 1 has no pads)
    with pytest.raises(UserError, match="model.max_len=8"):
        model(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(UserError, match="model.hidden=10 must be a multiple of model.heads=4"):
        BERT4Rec(num_items=30, hidden=10, heads=4)


def test_bert4rec_starts_every_weight_as_bert_does():
    # BERT's truncated N(0, 0.02) (cut at 2σ: std 0.88·0.02) for embeddings and every weight
    # matrix, attention's fused q/k/v projection included (torch would give it Xavier's 0.09 here)
    torch.manual_seed(0)
    model = BERT4Rec(num_items=500, max_len=50, hidden=64)
    matrices = {name: p for name, p in model.named_parameters() if p.ndim == 2}
    assert any("in_proj_weight" in name for name in matrices)
    for name, weight in matrices.items():
        assert weight.abs().max() <= 0.04, name
        assert 0.015 < weight[weight != 0].std() < 0.02, name
    assert all(not p.detach().any() for name, p in model.named_parameters() if name.endswith("in_proj_bias"))


def test_bert4rec_composes_with_both_sequence_tasks(compose_cfg):
    for task in ("ml1m", "synthetic_seqrec"):
        cfg = compose_cfg([f"task={task}", "model=bert4rec"])
        model = instantiate(cfg.model)
        assert model.num_items == cfg.task.num_items and model.positions.num_embeddings == cfg.task.max_len


# -- runs ---------------------------------------------------------------------------------------

SMALL = ["model=bert4rec", "model.hidden=16", "model.layers=1", "trainer.batch_size=4", "trainer.progress=off"]


def test_gen_adam_trains_bert4rec_on_a_movielens_fixture(genrun, tmp_path):
    write_ratings(tmp_path / "data", fixture_rows())
    run = tmp_path / "run"
    proc = genrun("task=ml1m", f"task.data_dir={tmp_path / 'data'}", "task.num_items=30", "task.negatives=10",
                  "task.max_len=8", *SMALL, "optim=gen_adam", "optim.gen.every=1", "trainer.epochs=2",
                  f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 6
    for split in ("val", "test"):
        metrics = summary["final"][split]
        assert {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 5, 10, 20)} <= set(metrics)
        assert metrics["recall@20"] == 1.0  # 11 candidates: the target is always in the top 20
        assert 0.0 <= metrics["ndcg@1"] <= metrics["ndcg@5"] <= metrics["ndcg@10"] <= 1.0
    records = [json.loads(line) for line in (run / "gen.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))  # GeN probed every Cloze step


def test_bert4rec_learns_the_synthetic_successions(genrun, tmp_path):
    run = tmp_path / "run"
    proc = genrun("task=synthetic_seqrec", "task.users=300", "model=bert4rec", "model.dropout=0.1", "optim=adam",
                  "optim.lr=0.003", "trainer.max_steps=600", "trainer.epochs=100", "trainer.batch_size=32",
                  "trainer.eval_batch_size=300", "trainer.progress=off", "logger=none", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    test = json.loads((run / "summary.json").read_text())["final"]["test"]
    # 80 % of next items are one of 3 successors of the last: learning them beats chance (10/101) by far
    assert test["recall@10"] > 0.4, test


def test_a_model_for_another_task_family_is_a_one_line_error(genrun, tmp_path):
    for args, needs, fits in ((["task=ml1m", "model=small_cnn"], "task.in_channels", "bert4rec"),
                              (["model=bert4rec"], "task.num_items", "small_cnn"),
                              (["task=rosenbrock", "model=small_cnn"], "task.in_channels", "point")):
        proc = genrun(*args, f"hydra.run.dir={tmp_path / 'run'}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1 and needs in proc.stderr and fits in proc.stderr
        assert not (tmp_path / "run").exists()


def test_table7_presets_compose_every_row(compose_cfg):
    rows = options("experiment/table7_row")
    assert set(rows) == {"gen_large", "constant_large", "constant_small", "gen_small", "gen_large_next"}
    for preset, large, small in (("table7", 1024, 128), ("table7_offline", 256, 32)):
        for row in rows:
            cfg = compose_cfg([f"+experiment={preset}", f"experiment/table7_row={row}"])
            assert cfg.model._target_.endswith("BERT4Rec") and cfg.optim.lr == 1e-3
            assert cfg.trainer.batch_size == (small if "small" in row else large)
            assert bool(cfg.optim.get("gen")) == row.startswith("gen")
            if row.startswith("gen"):
                assert cfg.optim.name == "adam" and cfg.optim.gen.horizon == "none"
                assert cfg.optim.gen.probe == ("next" if row.endswith("next") else "same")
        assert cfg.task.name == ("ml1m" if preset == "table7" else "synthetic_seqrec")


def test_table7_offline_sweep_and_its_report(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "+experiment=table7_offline", "hydra/launcher=basic", "seed=0,1", "task.users=40",
                  "trainer.epochs=2", "model.hidden=16", "model.layers=1", "table7.batch.large=16",
                  "table7.batch.small=8", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    report = subprocess.run([str(GENRUN.with_name("genrun-report")), str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    table = (sweep / "table7.md").read_text()
    assert "SYNTHETIC" in table and (sweep / "table7_curves.png").stat().st_size > 10_000
    summaries = {}
    for summary in sweep.glob("*/summary.json"):
        run = json.loads(summary.read_text())
        row = OmegaConf.load(summary.parent / ".hydra" / "config.yaml").table7.row
        summaries.setdefault(row, []).append(run["final"]["test"])
    assert set(summaries) == {"gen_large", "constant_large", "constant_small", "gen_small", "gen_large_next"}
    lines = {line.split("|")[1].strip() + line.split("|")[2].strip(): line for line in table.splitlines()
             if line.startswith("| ") and "| 2" in line}
    for row, finals in summaries.items():
        batch = 8 if "small" in row else 16
        line = lines[table7.LABEL[row] + str(batch)]
        values = [float(c.split("±")[0]) for c in line.split("|")[4:-1]]
        expected = [sum(f[m] for f in finals) / 2 for m in table7.METRICS]
        assert values == pytest.approx(expected, abs=6e-4), row


@pytest.mark.parametrize("devices", [1, 2])
def test_a_stopped_and_resumed_run_draws_the_same_masks(genrun, tmp_path, devices):
    # the Cloze masks and dropout come from torch's RNG, which checkpoints carry (each data-parallel
    # process's own): stopping mid-epoch at step 5 and resuming must end with the weights and the log
    # of a run that never stopped. With 2 processes BERT4Rec's scores go through forward, so DDP sees
    # every parameter the loss uses.
    args = ["task=synthetic_seqrec", "task.users=60", *SMALL, "model.dropout=0.1", "trainer.batch_size=8",
            "trainer.epochs=2", f"trainer.devices={devices}", "optim=gen_adam", "optim.gen.horizon=none",
            "logger=none"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert genrun(*args, f"hydra.run.dir={straight}").returncode == 0
    assert genrun(*args, "trainer.max_steps=5", f"hydra.run.dir={stopped}").returncode == 0
    proc = genrun(f"trainer.resume={stopped}", "trainer.max_steps=null")
    assert proc.returncode == 0, proc.stderr
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, stopped))
    assert a["step"] == b["step"] == 16 and len(a["rng_ranks"] or [a["rng"]]) == devices
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    def trained(run_dir):  # the stopped run also evaluated at step 5; wall-clock seconds always differ
        return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line]

    assert trained(straight) == trained(stopped)
    if devices == 2:
        proc = genrun(f"trainer.resume={stopped}", "trainer.devices=1")
        assert proc.returncode == 2
        assert proc.stderr.strip() == ("genrun: error: trainer.devices=1 but the checkpoint was written by 2 "
                                       "process(es); resume with trainer.devices=2")


def test_table7_cells_count_diverged_and_dead_seeds():
    from pathlib import Path

    from genrun.report.runs import Run

    def run(status, value=None, warning=None):
        final = {"test": {m: value for m in table7.METRICS}} if value is not None else {}
        return Run(Path("."), OmegaConf.create({}), {"status": status, "final": final, "warning": warning})

    values, note = table7.cells([run("diverged"), run("finished", 0.5), run("finished", 0.1, "at chance")])
    assert note == " (1 diverged, 1 at chance)" and values[0] == "0.300 ±0.200"
    assert table7.cells([run("diverged")]) == (["n/a"] * len(table7.METRICS), " (1 diverged)")


def test_table7_curves_count_epochs_from_the_log_not_the_config(tmp_path):
    from omegaconf import OmegaConf

    from genrun.report.runs import Run

    def run(steps: int, per_epoch: int) -> Run:
        records = [{"kind": "train", "step": s, "epoch": (s - 1) // per_epoch, "lr": [0.1]}
                   for s in range(1, steps + 1)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        # the config says 100 epochs, but trainer.max_steps stopped the run: the log knows the epoch length
        made = Run(tmp_path, OmegaConf.create({"trainer": {"epochs": 100, "max_steps": steps}}), {"total_steps": steps})
        _ = made.records  # read now: the next call rewrites the file
        return made

    assert table7.steps_per_epoch(run(steps=25, per_epoch=7)) == 7
    assert table7.steps_per_epoch(run(steps=5, per_epoch=7)) is None  # never left its first epoch: plot steps
