"""Sequential recommendation: BERT4Rec's masked-item training and leave-one-out ranking.

The protocol of Sun et al. (2019, "BERT4Rec"), which the paper's Table 7 follows (B.5):

* each user's interactions, in time order, form one sequence of item ids (1..n; 0 pads,
  n + 1 is the mask token);
* leave-one-out: the last item is the test target, the one before it the validation
  target, the rest is training data;
* training (Cloze): each position of the last ``max_len`` training items is replaced by
  the mask token with probability ``mask_prob`` (at least one per sequence) and the loss
  is the cross-entropy of the hidden items over all n items;
* evaluation: the history (training items, plus the validation item for the test split)
  ends in a mask token; the target is ranked among ``negatives`` items the user never
  interacted with, drawn once (fixed by ``split_seed``) in proportion to popularity.
  Recall@k and NDCG@k average over users; a target tied with a negative ranks below it,
  so a network that scores every item alike gets no credit.

Tasks: MovieLens-1M (``ml1m``, GroupLens's ``ratings.dat`` as published) and a
procedural, offline one (``synthetic_seqrec``). Masks are a function of (seed, epoch,
user), so runs and resumed runs repeat exactly.

The model contract (``genrun.models.BERT4Rec``): ``model(tokens)`` returns hidden states
``[B, L, d]``, ``model.item_logits(h)`` the scores of items 1..n, and ``model(tokens, at=mask)``
the scores at the masked positions (the training loss, one forward for DDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from genrun.errors import DataMissing, UserError
from genrun.tasks.base import CHANCE_FACTOR, Task

PAD = 0
KS = (1, 5, 10, 20)
ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"


def leave_one_out(sequences: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(training prefixes, validation targets, test targets) of sequences of length >= 3."""
    return [s[:-2] for s in sequences], np.array([s[-2] for s in sequences]), np.array([s[-1] for s in sequences])


def popularity_negatives(sequences: list[np.ndarray], num_items: int, count: int, seed: int) -> np.ndarray:
    """``[users, count]`` items each user never interacted with, drawn without replacement
    in proportion to how often all users interacted with them (Sun et al.'s sampler)."""
    counts = np.bincount(np.concatenate(sequences), minlength=num_items + 1)[1:].astype(np.float64)
    counts += 1e-9  # an item nobody has seen stays drawable, just last
    rng = np.random.default_rng(seed)
    out = np.empty((len(sequences), count), dtype=np.int64)
    for u, seq in enumerate(sequences):
        weights = counts.copy()
        weights[seq - 1] = 0.0
        if np.count_nonzero(weights) < count:
            raise UserError(f"task.negatives={count}: a user has interacted with all but "
                            f"{np.count_nonzero(weights)} of the {num_items} items; lower task.negatives")
        out[u] = rng.choice(num_items, size=count, replace=False, p=weights / weights.sum()) + 1
    return out


def _left_pad(items: np.ndarray, length: int) -> torch.Tensor:
    out = torch.full((length,), PAD, dtype=torch.long)
    if len(items):
        out[length - len(items):] = torch.as_tensor(items[-length:], dtype=torch.long)
    return out


class ClozeSequences(Dataset):
    """Training items ``(tokens, labels)``: masked positions carry the item in ``labels``, others 0.

    The masks of item i in epoch e are a function of (seed, e, i) alone (the engine calls
    :meth:`set_epoch`; ``seed`` defaults to torch's initial seed, which the engine sets from
    the run's), so they do not depend on what else drew random numbers before: a resumed run,
    a run that evaluates more often, or one that peeks at the next batch sees the same masks.
    """

    def __init__(self, sequences: list[np.ndarray], max_len: int, mask_prob: float, mask_token: int,
                 seed: int | None = None) -> None:
        self.sequences, self.max_len, self.mask_prob, self.mask_token = sequences, max_len, mask_prob, mask_token
        self.seed = torch.initial_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = _left_pad(self.sequences[i], self.max_len)
        real = items != PAD
        draw = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
        masked = (torch.rand(self.max_len, generator=draw) < self.mask_prob) & real
        if not masked.any():  # every sequence teaches something
            masked[-1] = True
        return items.masked_fill(masked, self.mask_token), items.masked_fill(~masked, PAD)


class RankingSet(Dataset):
    """Evaluation items ``(tokens, candidates)``: history + mask token; the target is candidates[0]."""

    def __init__(self, histories: list[np.ndarray], targets: np.ndarray, negatives: np.ndarray,
                 max_len: int, mask_token: int) -> None:
        self.histories, self.max_len, self.mask_token = histories, max_len, mask_token
        self.candidates = torch.as_tensor(np.concatenate([targets[:, None], negatives], axis=1), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.histories)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = _left_pad(np.append(self.histories[i][-(self.max_len - 1):], self.mask_token), self.max_len)
        return tokens, self.candidates[i]


def ranking_metrics(scores: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, torch.Tensor]:
    """Per-batch sums of recall@k and NDCG@k; ``scores[:, 0]`` is the target's, the rest negatives'.

    rank = how many negatives score at least as high as the target (ties count against it);
    recall@k = [rank < k], NDCG@k = [rank < k] / log2(rank + 2) (one relevant item, so IDCG = 1).
    """
    rank = (scores[:, 1:] >= scores[:, :1]).sum(dim=1).double()
    hits = {k: (rank < k).double() for k in ks}
    return {**{f"recall@{k}": hit.sum() for k, hit in hits.items()},
            **{f"ndcg@{k}": (hit / torch.log2(rank + 2)).sum() for k, hit in hits.items()}}


class SequentialRecTask(Task):
    """BERT4Rec's Cloze training and leave-one-out ranking over the sequences of ``sequences()``."""

    def __init__(self, num_items: int, max_len: int = 200, mask_prob: float = 0.2, negatives: int = 100,
                 split_seed: int = 0, **_: object) -> None:
        for key, value, low in (("num_items", num_items, 2), ("max_len", max_len, 2), ("negatives", negatives, 1)):
            if not (isinstance(value, int) and value >= low):
                raise UserError(f"task.{key}={value} is invalid: must be an integer >= {low}")
        if not 0.0 < mask_prob <= 1.0:
            raise UserError(f"task.mask_prob={mask_prob} is invalid: must be in (0, 1]")
        self.num_items, self.max_len, self.mask_prob = num_items, max_len, mask_prob
        self.negatives, self.split_seed = negatives, split_seed
        self.mask_token = num_items + 1

    def sequences(self) -> list[np.ndarray]:
        """Each user's item ids (1..num_items) in time order, every one at least 3 long."""
        raise NotImplementedError

    def datasets(self) -> tuple[Dataset, dict[str, Dataset]]:
        seqs = self.sequences()
        train, val_targets, test_targets = leave_one_out(seqs)
        negatives = popularity_negatives(seqs, self.num_items, self.negatives, self.split_seed)
        with_val = [np.append(s, v) for s, v in zip(train, val_targets)]
        return ClozeSequences(train, self.max_len, self.mask_prob, self.mask_token), {
            "val": RankingSet(train, val_targets, negatives, self.max_len, self.mask_token),
            "test": RankingSet(with_val, test_targets, negatives, self.max_len, self.mask_token),
        }

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(model(tokens, at=labels != PAD), labels[labels != PAD] - 1)

    def metric_sums(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        tokens, candidates = batch
        logits = model.item_logits(model(tokens)[:, -1]).float()
        loss = nn.functional.cross_entropy(logits, candidates[:, 0] - 1, reduction="sum")
        sums = ranking_metrics(logits.gather(1, candidates - 1))
        return {"loss": loss, **sums, "count": torch.tensor(len(tokens))}

    def diagnose(self, results: dict[str, dict[str, float]]) -> str | None:
        chance = 10 / (self.negatives + 1)  # recall@10 of a random ranking
        for split, metrics in results.items():
            recall = metrics.get("recall@10")
            if recall is not None and recall <= CHANCE_FACTOR * chance:
                return (f"{split} recall@10 {recall:.3f} is at chance ({chance:.3f} for a random ranking of "
                        f"{self.negatives + 1} items): the model learned nothing; metrics.jsonl has its loss per step")
        return None


class MovieLens1M(SequentialRecTask):
    """GroupLens's MovieLens-1M from ``data_dir/ml-1m/ratings.dat`` (UserID::MovieID::Rating::Timestamp).

    Every rating counts as an interaction (implicit feedback, as BERT4Rec); users with fewer
    than ``min_user`` ratings are dropped; movie ids are renumbered 1..n in increasing order;
    a user's ratings are ordered by timestamp, file order breaking ties. n must equal
    ``num_items`` (3,706 for the published file), which sizes the model.
    """

    name = "ml1m"

    def __init__(self, data_dir: str = "data", download: bool = False, min_user: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(min_user, int) and min_user >= 3):
            raise UserError(f"task.min_user={min_user} is invalid: must be an integer >= 3 (leave-one-out needs 3)")
        self.root = Path(data_dir).expanduser()
        self.download, self.min_user = download, min_user

    def ratings_file(self) -> Path:
        path = self.root / "ml-1m" / "ratings.dat"
        if not path.is_file() and self.download:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(ML1M_URL, download_root=str(self.root))
        if not path.is_file():
            raise DataMissing(f"task.data_dir: no MovieLens-1M at {path}; run with task.download=true (needs internet) "
                              f"or unzip ml-1m.zip from {ML1M_URL} into {self.root}")
        return path

    def sequences(self) -> list[np.ndarray]:
        path = self.ratings_file()
        try:
            rows = np.array(path.read_text(encoding="latin-1").replace("::", " ").split(), dtype=np.int64)
            rows = rows.reshape(-1, 4)
        except ValueError:
            raise UserError(f"task.data_dir: {path} is not in MovieLens's UserID::MovieID::Rating::Timestamp "
                            "format; re-extract ml-1m.zip") from None
        users, movies, stamps = rows[:, 0], rows[:, 1], rows[:, 3]
        ids, counts = np.unique(users, return_counts=True)
        keep = np.isin(users, ids[counts >= self.min_user])
        users, movies, stamps = users[keep], movies[keep], stamps[keep]
        _, items = np.unique(movies, return_inverse=True)
        order = np.lexsort((np.arange(len(users)), stamps, users))  # by user, then time, then file order
        users, items = users[order], items[order] + 1
        found = int(items.max()) if len(items) else 0
        if found != self.num_items:
            raise UserError(f"task.num_items={self.num_items} but {path} has {found} items rated by users with "
                            f">= {self.min_user} ratings; set task.num_items={found}")
        starts = np.flatnonzero(np.diff(users)) + 1
        return np.split(items, starts)


class SyntheticSequences(SequentialRecTask):
    """SYNTHETIC. Procedural users who mostly follow item-to-item successions.

    Each item has ``successors`` fixed follow-up items; a user starts at an item drawn by
    Zipf popularity and then, at each step, moves to one of the current item's successors
    with probability ``follow``, else to a Zipf-popular item. Sequence lengths are uniform
    in [``min_length``, ``max_length``]. A model that learns the successions ranks the next
    item well; popularity alone does not. Fixed by ``data_seed``.
    """

    name = "synthetic_seqrec"

    def __init__(self, users: int = 2000, min_length: int = 10, max_length: int = 20, successors: int = 3,
                 follow: float = 0.8, zipf: float = 1.1, data_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (isinstance(users, int) and users >= 1 and 3 <= min_length <= max_length and successors >= 1):
            raise UserError(f"task.users={users}, task.min_length={min_length}, task.max_length={max_length}, "
                            f"task.successors={successors}: "
                            "need users >= 1, 3 <= min_length <= max_length, successors >= 1")
        if not 0.0 <= follow <= 1.0:
            raise UserError(f"task.follow={follow} is invalid: must be in [0, 1]")
        self.users, self.min_length, self.max_length = users, min_length, max_length
        self.successors, self.follow, self.zipf, self.data_seed = successors, follow, zipf, data_seed

    def sequences(self) -> list[np.ndarray]:
        rng = np.random.default_rng(self.data_seed)
        n = self.num_items
        popularity = 1.0 / np.arange(1, n + 1) ** self.zipf
        popularity /= popularity.sum()
        nexts = rng.integers(1, n + 1, size=(n + 1, self.successors))
        out = []
        for length in rng.integers(self.min_length, self.max_length + 1, size=self.users):
            seq = rng.choice(n, size=length, p=popularity) + 1  # the popular picks; followers overwrite
            follows = rng.random(length) < self.follow
            picks = rng.integers(self.successors, size=length)
            for t in range(1, length):
                if follows[t]:
                    seq[t] = nexts[seq[t - 1], picks[t]]
            out.append(seq)
        return out
