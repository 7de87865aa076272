"""Data-to-text generation (NLG): the E2E restaurant data set as published, and an offline synthetic twin.

The paper's Table 3 fine-tunes GPT-2 with LoRA on E2E (Novikova et al., 2017). An E2E example
is a meaning representation (MR) such as ``name[The Eagle], eatType[pub], area[riverside]``
and one human reference text; an MR has several references, one CSV row each
(``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``; columns ``mr`` and ``ref``).

The model reads ``<mr> ||`` and learns to continue with `` <ref><eos>``: the loss is the
cross-entropy of the reference's tokens only. Evaluating a split reports that loss per token
and its perplexity over every (MR, reference) pair, then decodes one text per distinct MR
(greedy, or beam search with ``task.beams``) and scores it against all of that MR's references
with E2E's metrics (`genrun.tasks.nlg_metrics`).

``synthetic_e2e`` is procedural: random MRs in E2E's notation over invented restaurants, each
with references assembled from phrase templates in random order and wording.

The model contract (``genrun.text_models.CausalLM``): ``model(input_ids=.., attention_mask=..)``
returns next-token logits ``[B, T, vocab]``; ``model.generate(input_ids=.., attention_mask=..,
**kwargs)`` decodes as transformers does, from prompts padded on the left.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from genrun.errors import DataCorrupt, DataMissing, UserError
from genrun.parallel import share_of
from genrun.tasks.base import Task, pad
from genrun.tasks.nlg_metrics import METRICS, check_metrics, score as score_texts

E2E_URL = "https://github.com/tuetschek/e2e-dataset/archive/v1.0.0.zip"
E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
SEPARATOR = " ||"  # ends every prompt: where the reference starts
IGNORE = -100      # label of a prompt or padding position: no loss


def read_e2e(path: Path) -> list[tuple[str, str]]:
    """The (mr, ref) rows of one E2E CSV file, in file order."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("mr", "ref") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: no column {missing[0]!r} in the header; is this one of E2E's CSV files?")
            pairs = [(row["mr"].strip(), row["ref"].strip()) for row in reader if row["mr"] and row["ref"]]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataCorrupt(f"{path}: not a readable E2E CSV file ({str(err)[:160]}); download it again") from None
    if not pairs:
        raise UserError(f"{path}: no (mr, ref) rows; is this one of E2E's CSV files?")
    return pairs


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(end-of-text, padding) ids: GPT-2 has an eos but no pad; a BERT vocabulary has [SEP] and [PAD]."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise UserError("the tokenizer has neither an end-of-text nor a separator token to end a generated text")
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos


class Pairs(Dataset):
    """Token ids of (MR, reference) pairs, prompt then reference then eos; `collate` pads on the right.

    `groups` lists each distinct MR once, in first-seen order, as (prompt ids, its references):
    what decoding and scoring run over; `mrs` are their texts, and `group_of` is each pair's group.
    """

    def __init__(self, tokenizer: Any, pairs: list[tuple[str, str]], max_length: int) -> None:
        self.eos, self.pad = special_ids(tokenizer)
        by_mr: dict[str, list[str]] = {}
        for mr, ref in pairs:
            by_mr.setdefault(mr, []).append(ref)
        mrs = list(by_mr)
        prompt_ids = dict(zip(mrs, tokenizer([mr + SEPARATOR for mr in mrs], add_special_tokens=False)["input_ids"]))
        longest = max(len(ids) for ids in prompt_ids.values())
        if longest >= max_length:
            raise UserError(f"task.max_length={max_length} leaves no room for the text after a {longest}-token "
                            f"prompt; raise it above {longest}")
        targets = tokenizer([" " + ref for _, ref in pairs], add_special_tokens=False)["input_ids"]
        self.examples = []
        index = {mr: g for g, mr in enumerate(mrs)}
        self.group_of = [index[mr] for mr, _ in pairs]
        for (mr, _), target in zip(pairs, targets):
            prompt = prompt_ids[mr]
            ids = (prompt + target + [self.eos])[:max_length]
            labels = [IGNORE] * len(prompt) + ids[len(prompt):]
            self.examples.append((torch.tensor(ids), torch.tensor(labels)))
        self.groups = [(prompt_ids[mr], by_mr[mr]) for mr in mrs]
        self.mrs = mrs

    def head(self, n: int) -> Pairs:
        """The first `n` pairs and the MRs they belong to. Groups come in first-seen order, so those MRs
        are the first groups; each keeps every one of its references, which score its decoded text as
        the whole split would (the loss covers the `n` pairs only)."""
        cut = object.__new__(Pairs)
        kept = max(self.group_of[:n], default=-1) + 1
        cut.__dict__.update(self.__dict__, examples=self.examples[:n], group_of=self.group_of[:n],
                            groups=self.groups[:kept], mrs=self.mrs[:kept])
        return cut

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.examples[i]

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids, labels = zip(*items)
        return {"input_ids": pad(ids, self.pad), "labels": pad(labels, IGNORE),
                "attention_mask": pad([torch.ones_like(t) for t in ids], 0)}

    def prompts(self, chosen: Sequence[int]) -> dict[str, torch.Tensor]:
        """Prompts of the `chosen` groups, padded on the left as decoder-only generation needs."""
        ids = [torch.tensor(self.groups[g][0]) for g in chosen]
        return {"input_ids": pad(ids, self.pad, left=True),
                "attention_mask": pad([torch.ones_like(t) for t in ids], 0, left=True)}


class GenerationTask(Task):
    """Loss, perplexity, decoding and E2E's metrics of a causal LM on (MR, reference) pairs.

    Decoding: ``beams`` = 1 is greedy; ``max_new_tokens`` caps a text; ``no_repeat_ngram`` and
    ``length_penalty`` are transformers' (Hu et al. decode E2E with 10 beams, 0.9, 4);
    ``decode_limit`` decodes only the first that many MRs of a split (None: all).
    """

    def __init__(self, tokenizer: str, max_length: int = 128, metrics: list[str] | tuple[str, ...] = METRICS,
                 beams: int = 1, max_new_tokens: int = 64, no_repeat_ngram: int = 0, length_penalty: float = 1.0,
                 label_smoothing: float = 0.0, decode_limit: int | None = None) -> None:
        for key, value, low in (("max_length", max_length, 8), ("beams", beams, 1),
                                ("max_new_tokens", max_new_tokens, 1)):
            if not isinstance(value, int) or value < low:
                raise UserError(f"task.{key}={value} is invalid: must be an integer >= {low}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"task.label_smoothing={label_smoothing} is invalid: must be in [0, 1)")
        if decode_limit is not None and (not isinstance(decode_limit, int) or decode_limit < 1):
            raise UserError(f"task.decode_limit={decode_limit} is invalid: must be null (all) or an integer >= 1")
        self.metrics = check_metrics(list(metrics))
        self.tokenizer_name, self.max_length, self.label_smoothing = tokenizer, max_length, label_smoothing
        self.decoding = {"num_beams": beams, "max_new_tokens": max_new_tokens, "do_sample": False,
                         "no_repeat_ngram_size": no_repeat_ngram, "length_penalty": length_penalty}
        self.decode_limit = decode_limit

    @property
    def tokenizer(self) -> Any:
        if not hasattr(self, "_tokenizer"):
            from genrun.hf import OFFLINE_LM, load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name, key="task.tokenizer", offline=OFFLINE_LM)
        return self._tokenizer

    def encode(self, pairs: list[tuple[str, str]]) -> Pairs:
        return Pairs(self.tokenizer, pairs, self.max_length)

    def _token_losses(self, model: nn.Module, batch: dict[str, torch.Tensor], smoothing: float) -> torch.Tensor:
        """Cross-entropy of each next-token prediction ([B·(T-1)]; 0 where the label is ignored)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                           ignore_index=IGNORE, reduction="none", label_smoothing=smoothing)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        count = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
        return self._token_losses(model, batch, self.label_smoothing).sum() / count

    @torch.no_grad()
    def decode(self, model: nn.Module, data: Pairs, batch_size: int, to_device,
               chosen: Sequence[int] | None = None) -> list[str]:
        """One text per MR of `data.groups` (`chosen` ones, else the first `decode_limit`), eos and
        padding cut off."""
        if chosen is None:
            chosen = range(self.decoded(data))
        texts: list[str] = []
        for start in range(0, len(chosen), batch_size):
            prompts = to_device(data.prompts(chosen[start:start + batch_size]))
            out = model.generate(**prompts, eos_token_id=data.eos, pad_token_id=data.pad, **self.decoding)
            for row in out[:, prompts["input_ids"].shape[1]:].tolist():
                row = row[:row.index(data.eos)] if data.eos in row else row
                texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def decoded(self, data: Pairs) -> int:
        """How many of the split's MRs are decoded and scored (`decode_limit`)."""
        return len(data.groups) if self.decode_limit is None else min(self.decode_limit, len(data.groups))

    @torch.no_grad()
    def predict(self, model: nn.Module, loader, to_device) -> dict[str, Any]:
        total, tokens = 0.0, 0
        for batch in loader:  # the loss over this share's (MR, reference) pairs
            batch = to_device(batch)
            total += float(self._token_losses(model, batch, 0.0).sum())
            tokens += int((batch["labels"][:, 1:] != IGNORE).sum())
        whole, index, count = share_of(loader.dataset)  # texts: every count-th MR, decoded once
        chosen = range(index, self.decoded(whole), count)
        texts = self.decode(model, whole, loader.batch_size, to_device, chosen)
        return {"loss": total, "tokens": tokens, "mrs": [whole.mrs[g] for g in chosen],
                "texts": [(g, text, whole.groups[g][1]) for g, text in zip(chosen, texts)]}

    def head(self, data: Dataset, n: int) -> Dataset:
        """A `Pairs` of the first `n` pairs: its `groups` hold only their MRs, so decoding (and
        `decode_limit`, and each process's every-count-th MR) runs over those MRs alone."""
        return data.head(n) if isinstance(data, Pairs) else super().head(data, n)

    def examples(self, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each decoded MR with its text and references, in the split's MR order."""
        decoded = sorted((g, mr, text, refs) for p in parts for (g, text, refs), mr in zip(p["texts"], p["mrs"]))
        return [{"mr": mr, "prediction": text, "references": refs} for _, mr, text, refs in decoded]

    def score(self, parts: list[dict[str, Any]]) -> dict[str, float]:
        loss = sum(p["loss"] for p in parts) / max(sum(p["tokens"] for p in parts), 1)
        decoded = sorted(item for p in parts for item in p["texts"])  # in the split's MR order
        texts, refs = [text for _, text, _ in decoded], [r for _, _, r in decoded]
        out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), **score_texts(texts, refs, self.metrics)}
        out["words"] = float(np.mean([len(t.split()) for t in texts]))  # a collapsed decoder writes nothing
        return out

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        for split, metrics in results.items():
            if metrics.get("words", 1.0) < 1.0 or metrics.get("bleu", 100.0) < 1.0:
                return (f"{split}: the generated texts share almost nothing with the references (BLEU "
                        f"{metrics.get('bleu', float('nan')):.1f}, {metrics.get('words', 0):.1f} words on average); "
                        "metrics.jsonl has the loss and lr per step")
        return None


class E2E(GenerationTask):
    """E2E as published: ``<data_dir>/{trainset,devset,testset_w_refs}.csv`` (or the archive's
    ``e2e-dataset-1.0.0/`` folder in it); evaluated on ``dev`` and ``test`` (the one with references)."""

    def __init__(self, data_dir: str, tokenizer: str, name: str = "e2e", download: bool = False, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.name, self.root, self.download = name, Path(data_dir).expanduser(), download

    def _find(self) -> Path | None:
        return next((folder for folder in (self.root, self.root / "e2e-dataset-1.0.0")
                     if all((folder / name).is_file() for name in E2E_FILES.values())), None)

    def _folder(self) -> Path:
        if self._find() is None and self.download:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(E2E_URL, download_root=str(self.root))
        folder = self._find()
        if folder is None:
            raise DataMissing(f"task.data_dir: no E2E data ({', '.join(E2E_FILES.values())}) at {self.root}; run with "
                              f"task.download=true (needs internet) or unzip {E2E_URL} into {self.root}")
        return folder

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        folder = self._folder()
        sets = {split: self.encode(read_e2e(folder / file)) for split, file in E2E_FILES.items()}
        return sets.pop("train"), sets


# The synthetic restaurants (written for genrun): E2E's eight attributes, invented names, and for
# each attribute a few phrasings of a predicate about the restaurant ("serves {v} food").
NAMES = ("blue door", "the copper kettle", "green lantern", "the old mill", "the red fox", "silver spoon",
         "the golden goose", "harbour view", "the white hart", "olive tree", "the brass bell", "the corner house",
         "maple leaf", "the rusty anchor", "sunflower", "the stone bridge", "the grey heron", "little orchard")
VALUES = {
    "eatType": ("pub", "coffee shop", "restaurant"),
    "food": ("french", "italian", "japanese", "chinese", "english", "indian", "fast food"),
    "priceRange": ("cheap", "moderate", "high"),
    "customer rating": ("low", "average", "high"),
    "area": ("city centre", "riverside"),
    "familyFriendly": ("yes", "no"),
    "near": NAMES,
}
PHRASES = {
    "eatType": ("is a {v}", "is a nice {v}"),
    "food": ("serves {v} food", "offers {v} dishes", "has a {v} menu"),
    "priceRange": ("has {v} prices", "is in the {v} price range"),
    "customer rating": ("has a {v} customer rating", "is rated {v} by customers"),
    "area": ("is in the {v}", "is located in the {v}"),
    "familyFriendly": ("is family friendly", "is good for families"),
    "near": ("is near {v}", "is close to {v}"),
}
NEGATED = {"is family friendly": "is not family friendly", "is good for families": "is not good for families"}


def _join(predicates: list[str]) -> str:
    return predicates[0] if len(predicates) == 1 else ", ".join(predicates[:-1]) + " and " + predicates[-1]


class SyntheticE2E(GenerationTask):
    """SYNTHETIC. Random MRs in E2E's notation (a name and 2-6 other attributes) with
    ``refs_per_mr`` templated references each; ``dev`` and ``test`` draw new MRs."""

    def __init__(self, tokenizer: str, name: str = "synthetic_e2e", train_mrs: int = 500, eval_mrs: int = 100,
                 refs_per_mr: int = 4, data_seed: int = 0, **kwargs: Any) -> None:
        if min(train_mrs, eval_mrs, refs_per_mr) < 1:
            raise UserError("task.train_mrs, task.eval_mrs and task.refs_per_mr must be >= 1")
        super().__init__(tokenizer, **kwargs)
        self.name, self.sizes, self.refs_per_mr, self.data_seed = name, (train_mrs, eval_mrs), refs_per_mr, data_seed

    def reference(self, name: str, slots: dict[str, str], rng: np.random.Generator) -> str:
        """One text saying every attribute of `slots` about `name`, in a random order and wording."""
        predicates = []
        for slot in rng.permutation(list(slots)):
            phrase = PHRASES[slot][rng.integers(len(PHRASES[slot]))]
            if slot == "familyFriendly" and slots[slot] == "no":
                phrase = NEGATED[phrase]
            predicates.append(phrase.format(v=slots[slot]))
        cut = len(predicates) if len(predicates) <= 3 else int(rng.integers(2, len(predicates) - 1))
        text = f"{name} {_join(predicates[:cut])}."
        return text + (f" it {_join(predicates[cut:])}." if cut < len(predicates) else "")

    def pairs(self, mrs: int, seed: int) -> list[tuple[str, str]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(mrs):
            name = NAMES[rng.integers(len(NAMES))]
            chosen = rng.choice(len(VALUES), size=int(rng.integers(2, len(VALUES))), replace=False)
            slots = {}
            for slot in [list(VALUES)[i] for i in sorted(chosen)]:
                options = [v for v in VALUES[slot] if v != name]
                slots[slot] = options[rng.integers(len(options))]
            mr = ", ".join([f"name[{name}]", *(f"{slot}[{value}]" for slot, value in slots.items())])
            out += [(mr, self.reference(name, slots, rng)) for _ in range(self.refs_per_mr)]
        return out

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        train, evals = self.sizes
        seed = self.data_seed * 3
        return self.encode(self.pairs(train, seed + 1)), {
            "dev": self.encode(self.pairs(evals, seed + 2)),
            "test": self.encode(self.pairs(evals, seed + 3)),
        }
