"""Text generation: E2E's files as published, E2E's metrics, the causal LM (scratch, full, LoRA), decoding, runs.

Fixtures: E2E CSVs written as the release has them (header ``mr,ref``, every field quoted,
UTF-8 with £ and é, several rows per MR), and a tiny GPT-2 with a byte-level BPE tokenizer
trained here (vocab.json + merges.txt, as GPT-2's), both saved with save_pretrained.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import GENRUN, scored_in_shares
from genrun.errors import DataMissing, UserError
from genrun.parallel import Share
from genrun.tasks.nlg import E2E, IGNORE, SEPARATOR, Pairs, SyntheticE2E, read_e2e
from genrun.tasks.nlg_metrics import check_metrics, score
from genrun.text_models import CausalLM
from genrun.validate import validate

# (mr, ref) rows as E2E writes them: an MR repeats once per reference
ROWS = [
    ("name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]",
     "The Vaults pub near Café Adriatic has prices over £30."),
    ("name[The Vaults], eatType[pub], priceRange[more than £30], near[Café Adriatic]",
     "Near Café Adriatic, The Vaults is a pub, \"pricey\" at more than £30."),
    ("name[The Eagle], food[French], area[riverside]", "The Eagle serves French food by the riverside."),
    ("name[The Eagle], food[French], area[riverside]", "By the riverside, The Eagle offers French food."),
    ("name[The Eagle], food[French], area[riverside]", "The Eagle is a French place in the riverside area."),
    ("name[Aromi], familyFriendly[yes]", "Aromi is family friendly."),
]
TEXTS = [mr for mr, _ in ROWS] + [ref for _, ref in ROWS]
COCO_FREE = ["bleu", "nist", "rouge_l", "cider"]  # METEOR starts a JVM: kept to the tests that need it


def write_e2e(folder: Path, copies: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL)
            writer.writerow(["mr", "ref"])
            writer.writerows(ROWS * copies)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT-2 and a byte-level BPE tokenizer trained on the fixture's texts."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    out = tmp_path_factory.mktemp("tiny_gpt2")
    bpe = ByteLevelBPETokenizer()
    restaurants = [text for pair in SyntheticE2E("unused").pairs(100, seed=0) for text in pair]  # a word each
    bpe.train_from_iterator(TEXTS * 5 + restaurants, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(out))
    tokenizer = GPT2Tokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))  # GPT-2's two files
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def _tokenizer(path: Path):
    from genrun.hf import load_tokenizer

    return load_tokenizer(str(path))


# -- reading E2E ------------------------------------------------------------------------------------


def test_read_e2e_keeps_quoted_commas_and_unicode_and_every_reference(tmp_path):
    folder = write_e2e(tmp_path)
    pairs = read_e2e(folder / "trainset.csv")
    assert pairs == ROWS  # commas inside quotes, "£", "é" and inner quotes survive
    data = Pairs(_Words(), pairs, max_length=64)
    assert [len(refs) for _, refs in data.groups] == [2, 3, 1]  # one group per distinct MR, first-seen order


def test_read_e2e_names_a_file_that_is_not_e2e(tmp_path):
    (tmp_path / "a.csv").write_text("meaning,text\nx,y\n")
    with pytest.raises(UserError, match=r"a.csv: no column 'mr' in the header"):
        read_e2e(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("mr,ref\n")
    with pytest.raises(UserError, match=r"b.csv: no \(mr, ref\) rows"):
        read_e2e(tmp_path / "b.csv")


def test_e2e_finds_the_files_flat_or_in_the_release_folder_and_names_what_is_missing(tmp_path, tiny_gpt2):
    for folder in (tmp_path / "flat", tmp_path / "unzipped" / "e2e-dataset-1.0.0"):
        write_e2e(folder)
    for root in ("flat", "unzipped"):
        train, evals = E2E(str(tmp_path / root), str(tiny_gpt2), metrics=COCO_FREE).datasets()
        assert len(train) == len(ROWS) and set(evals) == {"dev", "test"}
    with pytest.raises(DataMissing, match=r"task.data_dir: no E2E data .* task.download=true"):
        E2E(str(tmp_path / "nothing"), str(tiny_gpt2)).datasets()


# -- examples, batches, loss ------------------------------------------------------------------------


class _Words:
    """A whitespace tokenizer with BERT's special tokens: [PAD] 0, [SEP] 1; no eos (like MiniLM's)."""

    eos_token_id, sep_token_id, pad_token_id = None, 1, 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {"[PAD]": 0, "[SEP]": 1}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocab.setdefault(w, len(self.vocab)) for w in t.split()] for t in texts]}


def test_pairs_mask_the_prompt_end_with_eos_and_pad_each_side_as_needed():
    words = _Words()
    data = Pairs(words, [("a[x], b[y]", "x is y"), ("c[z]", "z")], max_length=16)
    ids, labels = data[0]
    prompt = len(("a[x], b[y]" + SEPARATOR).split())
    assert ids[-1] == 1 and data.eos == 1 and data.pad == 0  # [SEP] ends the text when there is no eos
    assert (labels[:prompt] == IGNORE).all() and torch.equal(labels[prompt:], ids[prompt:])
    batch = data.collate([data[1], data[0]])
    assert batch["input_ids"].shape == (2, len(ids)) and batch["attention_mask"][0].sum() == len(data[1][0])
    assert (batch["labels"][0, len(data[1][0]):] == IGNORE).all()  # right padding carries no loss
    prompts = data.prompts(range(2))
    assert prompts["attention_mask"][1].tolist() == [0, 1, 1]  # left padding for generation
    assert prompts["input_ids"][1, 1:].tolist() == data.groups[1][0]
    with pytest.raises(UserError, match=r"task.max_length=3 leaves no room .* raise it above 3"):
        Pairs(words, [("a[x], b[y]", "x")], max_length=3)


def test_loss_is_the_mean_cross_entropy_of_the_reference_tokens_only(tiny_gpt2):
    task = SyntheticE2E(str(tiny_gpt2), metrics=COCO_FREE)
    data = task.encode(ROWS)
    model = CausalLM(64, 8, pretrained=str(tiny_gpt2))
    batch = data.collate([data[i] for i in range(3)])
    logits = model(batch["input_ids"], batch["attention_mask"]).detach()
    manual, count = 0.0, 0
    for row in range(3):
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["labels"][row, t] != IGNORE:
                manual += -torch.log_softmax(logits[row, t - 1], -1)[batch["labels"][row, t]]
                count += 1
    assert task.loss(model, batch).item() == pytest.approx(float(manual / count), rel=1e-5)


# -- metrics --------------------------------------------------------------------------------------


def test_metrics_reward_the_reference_and_score_against_any_of_several():
    refs = [["the eagle serves french food .", "french food is served at the eagle ."],
            ["aromi is family friendly ."]]
    perfect = score(["french food is served at the eagle .", "aromi is family friendly ."], refs)
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["rouge_l"] == pytest.approx(100.0)
    assert perfect["meteor"] > 0.95 and perfect["nist"] > 2.0 and perfect["cider"] > 1.0
    poor = score(["the eagle is a pub .", "aromi is not for children ."], refs)
    assert all(poor[k] < perfect[k] for k in perfect)
    from genrun.tasks.nlg_metrics import _meteor

    java = _meteor().meteor_p  # one METEOR Java process per Python process, reused by every score()
    assert score(["aromi is family friendly ."], refs[1:], ("meteor",))["meteor"] > 0.95
    assert _meteor().meteor_p is java and java.poll() is None
    one_ref = score(["french food is served at the eagle ."], [refs[0][:1]], ("bleu", "rouge_l"))
    assert one_ref["bleu"] < 100.0 and one_ref["rouge_l"] < 100.0  # the other reference was the match
    short = score(["eagle", ""], refs, ("nist", "bleu"))  # no hypothesis reaches NIST's 5-grams
    assert 0.0 < short["nist"] < perfect["nist"] and score(["", ""], refs, ("nist",))["nist"] == 0.0
    import sacrebleu

    assert perfect["bleu"] == pytest.approx(sacrebleu.corpus_bleu(
        ["french food is served at the eagle .", "aromi is family friendly ."],
        [[refs[0][0], refs[1][0]], [refs[0][1], None]]).score)


def test_metric_settings_are_checked_in_one_line(monkeypatch):
    with pytest.raises(UserError, match=r"task.metrics=\['bleu', 'spice'\] is invalid: choose from bleu"):
        check_metrics(["bleu", "spice"])
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(UserError, match=r"java is not on PATH.*'task.metrics=\[bleu,cider\]'"):
        check_metrics(["bleu", "meteor", "cider"])
    assert check_metrics(["bleu", "cider"]) == ("bleu", "cider")


@pytest.mark.parametrize("setting, message", [
    ({"beams": 0}, "task.beams=0 is invalid: must be an integer >= 1"),
    ({"max_length": 4}, "task.max_length=4 is invalid: must be an integer >= 8"),
    ({"label_smoothing": 1.0}, r"task.label_smoothing=1.0 is invalid: must be in \[0, 1\)"),
    ({"decode_limit": 0}, "task.decode_limit=0 is invalid: must be null"),
])
def test_decoding_settings_are_checked_in_one_line(setting, message):
    with pytest.raises(UserError, match=message):
        SyntheticE2E("unused", metrics=COCO_FREE, **setting)


# -- the model and decoding -----------------------------------------------------------------------


def test_finetune_modes_train_what_they_say(tiny_gpt2):
    def trainable(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}

    full = CausalLM(64, 8, pretrained=str(tiny_gpt2))
    assert trainable(full) == {n for n, _ in full.named_parameters()}
    bitfit = CausalLM(64, 8, pretrained=str(tiny_gpt2), finetune="bitfit")
    assert trainable(bitfit) and all(n.endswith(".bias") for n in trainable(bitfit))
    lora = CausalLM(64, 8, pretrained=str(tiny_gpt2), finetune="lora", lora_r=2, lora_dropout=0.0)
    assert trainable(lora) and all("c_attn.lora_" in n for n in trainable(lora))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(lora(ids, torch.ones_like(ids)), full(ids, torch.ones_like(ids)))  # B = 0 at the start


def test_model_settings_that_cannot_work_are_one_line_errors(tiny_gpt2):
    with pytest.raises(UserError, match=r"task.max_length \+ task.max_new_tokens = 200 exceeds the model's 128"):
        CausalLM(150, 50, pretrained=str(tiny_gpt2))
    with pytest.raises(UserError, match=r"model.finetune=lora needs pretrained weights"):
        CausalLM(64, 8, tokenizer=str(tiny_gpt2), finetune="lora")
    with pytest.raises(UserError, match=r"model.tokenizer is missing"):
        CausalLM(64, 8)
    scratch = CausalLM(64, 8, tokenizer=str(tiny_gpt2), layers=1, width=16, heads=2, positions=80)
    assert scratch.net.config.vocab_size == len(_tokenizer(tiny_gpt2)) and scratch.net.config.n_positions == 80


def test_checkpoints_that_cannot_load_point_to_the_offline_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub name fails at once, without the network
    with pytest.raises(UserError, match=r"task.tokenizer=gpt2: cannot load the tokenizer .* use model=gpt2_tiny"):
        SyntheticE2E("gpt2", metrics=COCO_FREE, train_mrs=2, eval_mrs=1).datasets()
    message = r"model.pretrained=.*: cannot load the model from a local directory.*gpt2_tiny"
    with pytest.raises(UserError, match=message):
        CausalLM(64, 8, pretrained=str(tmp_path))


def test_batched_decoding_from_left_padded_prompts_equals_one_at_a_time(tiny_gpt2):
    task = SyntheticE2E(str(tiny_gpt2), metrics=COCO_FREE, max_new_tokens=6)
    model = CausalLM(64, 6, pretrained=str(tiny_gpt2)).eval()
    data = task.encode(ROWS)  # prompts of different lengths: the short ones are padded
    assert len({len(ids) for ids, _ in data.groups}) > 1
    together = task.decode(model, data, batch_size=3, to_device=lambda b: b)
    alone = [task.decode(model, _only(data, i), batch_size=1, to_device=lambda b: b)[0] for i in range(3)]
    assert together == alone and len(together) == 3
    task.decode_limit = 2
    assert task.decode(model, data, batch_size=3, to_device=lambda b: b) == together[:2]


def test_shares_of_a_split_decode_each_mr_once_and_score_as_the_whole_split_does(tiny_gpt2):
    # the loss is pooled over the shares' (MR, reference) pairs; texts over every count-th MR
    task = SyntheticE2E(str(tiny_gpt2), metrics=COCO_FREE, max_new_tokens=8)
    torch.manual_seed(0)
    model = CausalLM(64, 8, pretrained=str(tiny_gpt2)).eval()
    data = task.encode(ROWS * 2 + [(f"name[Spot {i}]", f"Spot {i} is a place.") for i in range(4)])
    shared, whole = scored_in_shares(task, model, data, count=3)
    assert shared == pytest.approx(whole, rel=1e-6) and whole["words"] > 0
    parts = [task.predict(model, torch.utils.data.DataLoader(Share(data, i, 3), batch_size=4, collate_fn=data.collate),
                          lambda b: b) for i in range(3)]
    decoded = sorted(item for part in parts for item in part["texts"])
    assert [g for g, _, _ in decoded] == list(range(len(data.groups)))  # each MR decoded by one share
    assert [text for _, text, _ in decoded] == task.decode(model, data, batch_size=4, to_device=lambda b: b)
    task.decode_limit = 2
    assert len([item for i in range(3) for item in task.predict(
        model, torch.utils.data.DataLoader(Share(data, i, 3), batch_size=4, collate_fn=data.collate),
        lambda b: b)["texts"]]) == 2


def _only(data: Pairs, i: int) -> Pairs:
    single = object.__new__(Pairs)
    single.__dict__.update(data.__dict__, groups=[data.groups[i]])
    return single


# -- the synthetic task ---------------------------------------------------------------------------


def test_synthetic_references_say_every_attribute_of_their_mr():
    task = SyntheticE2E("unused", refs_per_mr=3)
    pairs = task.pairs(60, seed=1)
    assert len(pairs) == 180 and len({mr for mr, _ in pairs}) > 50
    for mr, ref in pairs:
        slots = dict(part[:-1].split("[") for part in mr.split(", "))
        assert ref.startswith(slots.pop("name") + " ")
        for slot, value in slots.items():
            if slot == "familyFriendly":
                assert (" not " in ref) == (value == "no"), (mr, ref)
            else:
                assert value in ref, (mr, ref)
    assert task.pairs(5, seed=1) == task.pairs(5, seed=1) != task.pairs(5, seed=2)
    assert len({ref for mr, ref in pairs if mr == pairs[0][0]}) >= 2  # wording and order vary


# -- configs and runs -----------------------------------------------------------------------------


def test_generation_tasks_compose_with_both_causal_models_and_not_with_others(compose_cfg, tmp_path):
    for task in ("e2e", "synthetic_e2e"):
        for model in ("gpt2", "gpt2_tiny"):
            cfg = compose_cfg([f"task={task}", f"model={model}", f"task.data_dir={tmp_path}"]
                              if task == "e2e" else [f"task={task}", f"model={model}"])
            validate(cfg)
            assert cfg.task.tokenizer == cfg.model.tokenizer and instantiate(cfg.task).name == task
        with pytest.raises(UserError, match=r"model \(TextClassifier\) needs task.num_labels.*gpt2, gpt2_tiny"):
            validate(compose_cfg([f"task={task}", "model=minilm"]))
    with pytest.raises(UserError, match=r"model \(CausalLM\) needs task.max_new_tokens"):
        validate(compose_cfg(["task=sst2", "model=gpt2"]))


def test_table3_presets_compose_every_row(compose_cfg):
    for preset in ("table3", "table3_offline"):
        for row in ("gen", "linear", "cosine", "constant", "invsqrt", "inv"):
            cfg = compose_cfg([f"+experiment={preset}", f"experiment/table3_row={row}"])
            validate(cfg)
            assert cfg.optim.lr == 1e-3 and cfg.table3.row == row
            if row == "gen":
                assert cfg.optim.name == "adamw" and cfg.optim.gen.every == 4 and cfg.optim.gen.horizon == "none"
            else:
                assert "gen" not in cfg.optim and cfg.sched._target_ == f"genrun.sched.{row}"
    cfg = compose_cfg(["+experiment=table3"])
    assert (cfg.model.pretrained, cfg.model.finetune) == ("gpt2", "lora")
    assert (cfg.trainer.batch_size, cfg.trainer.epochs) == (256, 5)
    assert (cfg.task.beams, cfg.task.length_penalty, cfg.task.no_repeat_ngram) == (10, 0.9, 4)


TINY = ["trainer.progress=off", "logger=none", "trainer.batch_size=4", "task.max_length=64", "task.max_new_tokens=8"]


def test_gen_adamw_trains_lora_on_e2e_files_and_scores_every_metric(genrun, tmp_path, tiny_gpt2):
    write_e2e(tmp_path / "e2e", copies=2)
    run = tmp_path / "run"
    proc = genrun("task=e2e", f"task.data_dir={tmp_path / 'e2e'}", "task.beams=2", "model=gpt2",
                  f"model.pretrained={tiny_gpt2}", "optim=gen_adamw", "optim.gen.every=1", "trainer.epochs=1",
                  *TINY, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 3
    assert set(summary["final"]) == {"dev", "test"}
    assert {"loss", "ppl", "bleu", "nist", "meteor", "rouge_l", "cider", "words"} == set(summary["final"]["test"])
    records = [json.loads(line) for line in (run / "gen.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(3))
    assert "test: loss" in proc.stdout and "bleu" in proc.stdout


def test_a_check_inside_the_model_is_a_one_line_error_and_leaves_no_run(genrun, tmp_path, tiny_gpt2):
    write_e2e(tmp_path / "e2e")
    proc = genrun("task=e2e", f"task.data_dir={tmp_path / 'e2e'}", "model=gpt2", f"model.pretrained={tiny_gpt2}",
                  "task.max_length=200", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "task.max_length + task.max_new_tokens = 264 exceeds the model's 128 positions" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_gpt2_from_scratch_learns_the_synthetic_restaurants(genrun, tmp_path, tiny_gpt2):
    run = tmp_path / "run"  # model=gpt2_tiny with the fixture's 600-word vocabulary: MiniLM's 30,522 are slow here
    proc = genrun("task=synthetic_e2e", "model=gpt2_tiny", f"model.tokenizer={tiny_gpt2}", "model.width=64",
                  "task.train_mrs=100", "task.eval_mrs=20", f"task.metrics={COCO_FREE}".replace("'", ""),
                  "optim=adamw", "optim.lr=3e-3", "trainer.epochs=4", "trainer.threads=2", "trainer.progress=off",
                  "logger=none", "trainer.batch_size=16", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert train[0] > 6.0 > 2.0 > train[-1]  # from ln(600) = 6.4, a uniform guess
    test = json.loads((run / "summary.json").read_text())["final"]["test"]
    assert test["bleu"] > 20.0 and test["rouge_l"] > 40.0 and 5 < test["words"] < 40, test  # untrained: ~0


def test_two_processes_evaluate_generation_as_one_does(genrun, tmp_path, tiny_gpt2):
    # an lr of 1e-12 leaves the weights as they start: both runs score the same model, one of
    # them in two processes that each decode half of the MRs and gather the texts
    finals = []
    for devices in (1, 2):
        run = tmp_path / str(devices)
        proc = genrun("task=synthetic_e2e", "model=gpt2_tiny", f"model.tokenizer={tiny_gpt2}", "model.width=64",
                      "task.train_mrs=8", "task.eval_mrs=5", "task.max_new_tokens=8",
                      f"task.metrics={COCO_FREE}".replace("'", ""), "optim=adamw", "optim.lr=1e-12",
                      "trainer.max_steps=1", "trainer.batch_size=4", f"trainer.devices={devices}",
                      "trainer.progress=off", "logger=none", f"hydra.run.dir={run}")
        assert proc.returncode == 0, proc.stderr
        finals.append(json.loads((run / "summary.json").read_text())["final"])
    assert finals[1].keys() == finals[0].keys() == {"dev", "test"}
    for split in ("dev", "test"):
        assert finals[1][split] == pytest.approx(finals[0][split], rel=1e-5), split


def test_table3_report_from_an_offline_sweep(genrun, tmp_path):
    sweep = tmp_path / "sweep"
    proc = genrun("-m", "+experiment=table3_offline", "task.train_mrs=8", "task.eval_mrs=3",
                  f"task.metrics={COCO_FREE}".replace("'", ""), "task.max_new_tokens=4", "model.width=16",
                  "model.heads=2", "trainer.max_steps=2", "trainer.batch_size=8", "hydra/launcher=basic", "seed=0",
                  "experiment/table3_row=gen,linear", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr
    report = subprocess.run([str(GENRUN.with_name("genrun-report")), str(sweep)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    text = (sweep / "table3.md").read_text()
    assert "SYNTHETIC" in text and "| row | seeds | BLEU | ROUGE-L | NIST | METEOR | CIDEr | ppl |" in text
    assert "| GeN-AdamW | 1 | " in text and "| linear decay | 1 | " in text
    assert "| GeN-AdamW | 67.3 | 67.09 | 8.6508 | 0.4407 | 2.281 |" in text  # the paper's row follows
    assert "n/a" in text.split("| linear decay | 1 |")[1].splitlines()[0]  # METEOR was not asked for
    assert (sweep / "table3_curves.png").stat().st_size > 0
