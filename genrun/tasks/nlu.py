"""Text classification and regression (NLU): GLUE as published, and an offline synthetic task.

The paper's Table 4 fine-tunes RoBERTa-base on GLUE. A GLUE task here reads the TSV files
that GLUE's download unpacks (``<data_dir>/SST-2/train.tsv``, ``dev.tsv``, ...), tokenizes
them once with the model's own tokenizer (``task.tokenizer``, by default
``${model.pretrained}``), keeps the ids on disk for the next run (``task.token_cache``,
genrun.tasks.token_cache) and pads each batch to its longest example. It is evaluated on
GLUE's dev files (the test files carry no labels) with GLUE's metrics: accuracy,
Matthews correlation (CoLA), F1 of the positive class (MRPC, QQP), Pearson and Spearman
correlation (STS-B, a regression: one output, mean squared error).

``synthetic_sentiment`` is procedural: short templated reviews whose label is the
adjective's polarity, flipped by a negation. Its ``unseen`` split uses adjectives the
training set never contains, so only what the pretrained encoder already knows about
those words can score there.

The model contract (``genrun.text_models.TextClassifier``): ``model(input_ids=..,
attention_mask=.., [token_type_ids=..])`` returns logits ``[B, num_labels]``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from genrun.errors import DataCorrupt, DataMissing, UserError
from genrun.tasks.base import Task, pad
from genrun.tasks.token_cache import FIELDS, cached_tokenize

GLUE_URL = "https://dl.fbaipublicfiles.com/glue/data/{}.zip"


@dataclass(frozen=True)
class GlueSpec:
    """Where one GLUE task's files are and how to read them."""

    folder: str                   # the directory GLUE's archive unpacks to
    text: tuple[Any, ...]         # the one or two text columns (header names; indices without a header)
    label: Any                    # the label column
    labels: tuple[str, ...] | None  # label strings in class-id order; None: a real-valued score
    metrics: tuple[str, ...]      # GLUE's metrics for the task, the one papers report first
    dev: tuple[str, ...] = ("dev",)  # the labelled evaluation files, also the split names
    header: bool = True
    archive: str | None = None    # the zip's name on GLUE's server (None: no public archive)


BINARY = ("0", "1")
ENTAIL = ("entailment", "not_entailment")
GLUE: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", (3,), 1, BINARY, ("mcc", "acc"), header=False, archive="CoLA"),
    "sst2": GlueSpec("SST-2", ("sentence",), "label", BINARY, ("acc",), archive="SST-2"),
    "mrpc": GlueSpec("MRPC", ("#1 String", "#2 String"), "Quality", BINARY, ("f1", "acc")),
    "qqp": GlueSpec("QQP", ("question1", "question2"), "is_duplicate", BINARY, ("f1", "acc"), archive="QQP-clean"),
    "stsb": GlueSpec("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), archive="STS-B"),
    "mnli": GlueSpec("MNLI", ("sentence1", "sentence2"), "gold_label", ("contradiction", "entailment", "neutral"),
                     ("acc",), dev=("dev_matched", "dev_mismatched"), archive="MNLI"),
    "qnli": GlueSpec("QNLI", ("question", "sentence"), "label", ENTAIL, ("acc",), archive="QNLIv2"),
    "rte": GlueSpec("RTE", ("sentence1", "sentence2"), "label", ENTAIL, ("acc",), archive="RTE"),
    "wnli": GlueSpec("WNLI", ("sentence1", "sentence2"), "label", BINARY, ("acc",), archive="WNLI"),
}


def read_glue(path: Path, spec: GlueSpec) -> tuple[list[tuple[str, ...]], list[float]]:
    """(texts, labels) of one GLUE TSV; labels are class ids, or scores for a regression task.

    Quotes are literal in GLUE's files (QUOTE_NONE); rows with missing fields, which a few
    of QQP's and MNLI's releases have, are skipped.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # MRPC's files start with a BOM
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataCorrupt(f"{path}: not a readable GLUE file ({str(err)[:160]}); "
                          f"download {spec.folder} again") from None
    columns = (*spec.text, spec.label)
    if spec.header:
        header, rows = rows[0], rows[1:]
        missing = [c for c in columns if c not in header]
        if missing:
            raise UserError(f"{path}: no column {missing[0]!r} in the header; is this GLUE's {spec.folder} file?")
        columns = tuple(header.index(c) for c in columns)
    width = max(columns) + 1
    texts, labels = [], []
    for line, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) < width:
            continue
        raw = row[columns[-1]].strip()
        if spec.labels is None:
            labels.append(float(raw))
        elif raw in spec.labels:
            labels.append(float(spec.labels.index(raw)))
        else:
            raise UserError(f"{path}:{line}: label {raw!r} is not one of {', '.join(spec.labels)}")
        texts.append(tuple(row[c] for c in columns[:-1]))
    if not texts:
        raise UserError(f"{path}: no examples; is this GLUE's {spec.folder} file?")
    return texts, labels


class Encoded(Dataset):
    """Token ids of (text, [text pair]) examples, stored flat (genrun.tasks.token_cache);
    `collate` pads a batch to its longest."""

    def __init__(self, arrays: dict[str, torch.Tensor], labels: list[float], pad_id: int, regression: bool) -> None:
        self.offsets = arrays["offsets"].tolist()
        self.keys = [k for k in FIELDS if k in arrays]
        self.flat = {k: arrays[k] for k in self.keys}
        self.labels = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return {**{k: self.flat[k][start:end].long() for k in self.keys}, "labels": self.labels[i]}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {"labels": torch.stack([item["labels"] for item in items]),
                 "attention_mask": pad([torch.ones_like(item["input_ids"]) for item in items], 0)}
        for key in self.keys:
            batch[key] = pad([item[key] for item in items], self.pad_id if key == "input_ids" else 0)
        return batch


def scores(metrics: tuple[str, ...], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics of predictions (class ids, or scores for a regression) against labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    out: dict[str, float] = {}
    for name in metrics:
        if name == "acc":
            out[name] = float((preds == labels).mean())
        elif name == "f1":
            out[name] = float(f1_score(labels, preds, zero_division=0.0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, preds))
        else:  # a constant prediction has no correlation: score it 0, not NaN
            constant = np.ptp(preds) == 0 or np.ptp(labels) == 0
            stat = pearsonr if name == "pearson" else spearmanr
            out[name] = 0.0 if constant else float(stat(preds, labels)[0])
    return out


class TextTask(Task):
    """Loss and metrics of a text classifier (cross-entropy) or regressor (`num_labels` = 1, MSE)."""

    metrics: tuple[str, ...] = ("acc",)

    def __init__(self, tokenizer: str, num_labels: int, max_length: int = 128, token_cache: str | None = None) -> None:
        if max_length < 8:
            raise UserError(f"task.max_length={max_length} is invalid: must be an integer >= 8")
        self.tokenizer_name, self.num_labels, self.max_length = tokenizer, num_labels, max_length
        self.token_cache = token_cache

    def encode(self, texts: list[tuple[str, ...]], labels: list[float]) -> Encoded:
        from genrun.hf import load_tokenizer

        if not hasattr(self, "_tokenizer"):
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        arrays = cached_tokenize(self._tokenizer, texts, self.max_length, self.token_cache)
        return Encoded(arrays, labels, self._tokenizer.pad_token_id or 0, regression=self.num_labels == 1)

    def _outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).float()
        return (logits.squeeze(-1) if self.num_labels == 1 else logits), batch["labels"]

    def _loss(self, outputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.num_labels == 1:
            return nn.functional.mse_loss(outputs, labels, reduction=reduction)
        return nn.functional.cross_entropy(outputs, labels, reduction=reduction)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(*self._outputs(model, batch))

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, to_device) -> dict[str, Any]:
        # F1, MCC and correlations are not averages over batches: keep the predictions
        total, preds, labels = 0.0, [], []
        for batch in loader:
            outputs, target = self._outputs(model, to_device(batch))
            total += float(self._loss(outputs, target, reduction="sum"))
            preds.append((outputs if self.num_labels == 1 else outputs.argmax(-1)).cpu())
            labels.append(target.cpu())
        return {"loss": total, "pred": torch.cat(preds).numpy(), "label": torch.cat(labels).numpy()}

    def score(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        pred, label = np.concatenate([p["pred"] for p in parts]), np.concatenate([p["label"] for p in parts])
        out = {"loss": sum(p["loss"] for p in parts) / max(len(label), 1), **scores(self.metrics, pred, label)}
        if self.num_labels > 1:  # a network that predicts one class for everything has collapsed
            out["top_class_share"] = float(np.bincount(pred, minlength=self.num_labels).max() / max(len(pred), 1))
        return out

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        for split, metrics in results.items():
            if metrics.get("top_class_share", 0.0) >= 0.99:
                return (f"{split}: the network predicts one class for {100 * metrics['top_class_share']:.0f} % "
                        "of the examples: it learned nothing or collapsed; metrics.jsonl has its loss and lr per step")
        return None


class Glue(TextTask):
    """One GLUE task, read from ``<data_dir>/<folder>/{train,dev}.tsv`` as GLUE publishes them."""

    def __init__(self, name: str, data_dir: str, tokenizer: str, num_labels: int, max_length: int = 128,
                 download: bool = False, token_cache: str | None = None) -> None:
        if name not in GLUE:
            raise UserError(f"task.name={name} is not a GLUE task; one of {', '.join(GLUE)}")
        self.spec = GLUE[name]
        expected = 1 if self.spec.labels is None else len(self.spec.labels)
        if num_labels != expected:
            raise UserError(f"task.num_labels={num_labels}: GLUE's {name} has {expected}")
        super().__init__(tokenizer, num_labels, max_length, token_cache)
        self.name, self.metrics = name, self.spec.metrics
        self.root, self.download = Path(data_dir).expanduser(), download

    def _folder(self) -> Path:
        folder = self.root / self.spec.folder
        files = ["train", *self.spec.dev]
        if all((folder / f"{f}.tsv").is_file() for f in files):
            return folder
        if self.download and self.spec.archive:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(GLUE_URL.format(self.spec.archive), download_root=str(self.root))
            if all((folder / f"{f}.tsv").is_file() for f in files):
                return folder
        fetch = (f"run with task.download=true (needs internet) or unzip {self.spec.archive}.zip from GLUE into "
                 f"{self.root}" if self.spec.archive else
                 f"MRPC has no public archive: build train.tsv and dev.tsv from Microsoft's MSRParaphraseCorpus "
                 f"as GLUE's download script does, into {folder}")
        raise DataMissing(f"task.data_dir: no GLUE {self.spec.folder} ({', '.join(f + '.tsv' for f in files)}) "
                          f"at {folder}; {fetch}")

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        folder = self._folder()
        train = self.encode(*read_glue(folder / "train.tsv", self.spec))
        return train, {split: self.encode(*read_glue(folder / f"{split}.tsv", self.spec)) for split in self.spec.dev}


# Word lists of the synthetic reviews (written for genrun): each adjective has a clear polarity.
POSITIVE = ("good great excellent wonderful superb delightful brilliant charming enjoyable lovely beautiful "
            "moving clever fun pleasant terrific fantastic marvelous gripping touching stunning refreshing "
            "impressive funny warm inspiring elegant splendid smart solid").split()
NEGATIVE = ("bad awful terrible boring dull poor weak horrible dreadful tedious clumsy bland messy annoying "
            "pointless lifeless stupid painful disappointing forgettable lazy silly ugly flat tiresome mediocre "
            "sloppy confusing shallow predictable").split()
NOUNS = "movie film plot acting script story ending cast soundtrack dialogue pacing direction performance show".split()
ADVERBS = ("very", "really", "quite", "truly", "rather")
# (template, negated): the label is the adjective's polarity, flipped when negated
TEMPLATES = (
    ("the {n} was {a}.", False), ("the {n} was {v} {a}.", False), ("i thought the {n} was {a}.", False),
    ("what a {a} {n}.", False), ("the {n} was not {a}.", True), ("the {n} was not {v} {a}.", True),
    ("nobody would call the {n} {a}.", True), ("i would never say the {n} was {a}.", True),
)


class SyntheticSentiment(TextTask):
    """SYNTHETIC. Templated one-sentence reviews, label 1 = positive (see the module doc).

    A share ``unseen_share`` of each adjective list is held out of training; split ``dev``
    draws new sentences from the training adjectives, split ``unseen`` from the held-out ones.
    """

    def __init__(self, tokenizer: str, name: str = "synthetic_sentiment", num_labels: int = 2, max_length: int = 32,
                 train_size: int = 2000, eval_size: int = 500, unseen_share: float = 0.3, data_seed: int = 0) -> None:
        if num_labels != 2:
            raise UserError(f"task.num_labels={num_labels}: synthetic_sentiment has 2 classes")
        if not 0 < unseen_share < 1:
            raise UserError(f"task.unseen_share={unseen_share} is invalid: must be in (0, 1)")
        super().__init__(tokenizer, num_labels, max_length)
        self.name = name
        self.sizes, self.unseen_share, self.data_seed = (train_size, eval_size), unseen_share, data_seed

    def sentences(self, count: int, seen: bool, seed: int) -> tuple[list[tuple[str]], list[float]]:
        """`count` reviews with the training (`seen`) or held-out adjectives, and their labels."""
        split = np.random.default_rng(self.data_seed)
        words = []
        for polarity, adjectives in ((1, POSITIVE), (0, NEGATIVE)):
            held = max(1, round(self.unseen_share * len(adjectives)))
            order = split.permutation(len(adjectives))
            chosen = order[held:] if seen else order[:held]
            words += [(adjectives[i], polarity) for i in chosen]
        rng = np.random.default_rng(seed)
        texts, labels = [], []
        for _ in range(count):
            adjective, polarity = words[rng.integers(len(words))]
            template, negated = TEMPLATES[rng.integers(len(TEMPLATES))]
            noun, adverb = NOUNS[rng.integers(len(NOUNS))], ADVERBS[rng.integers(len(ADVERBS))]
            texts.append((template.format(n=noun, a=adjective, v=adverb),))
            labels.append(float(polarity ^ negated))
        return texts, labels

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        train, evals = self.sizes
        seed = self.data_seed * 3
        return self.encode(*self.sentences(train, True, seed + 1)), {
            "dev": self.encode(*self.sentences(evals, True, seed + 2)),
            "unseen": self.encode(*self.sentences(evals, False, seed + 3)),
        }
