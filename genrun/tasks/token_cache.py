"""Token ids of a text data set, computed once and kept on disk.

MNLI's 393k training pairs take ~35 s to tokenize on 2 cores, in every job of a sweep and in
every process of a data-parallel run. The ids are stored flat (one int32 tensor per field and
the examples' offsets), under a name that is a hash of everything they depend on: the
tokenizer's vocabulary and rules, `max_length` and every text. A changed file, tokenizer or
length is a new name, never a stale hit. Files are written whole and renamed into place, so
parallel jobs and a killed run leave either a complete file or none.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FORMAT = 1  # bump when the stored layout changes
FIELDS = ("input_ids", "token_type_ids")


def fingerprint(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_length: int) -> str:
    """A hash of what the ids depend on (the tokenizer's own settings for truncation and padding
    are left out: the call sets them, so they differ before and after the first one)."""
    h = hashlib.sha256(f"genrun-tokens-{FORMAT}|{type(tokenizer).__name__}|{max_length}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:  # a slow tokenizer: its vocabulary and special tokens
        h.update(json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens]).encode())
    for example in texts:
        for text in example:
            h.update(text.encode())
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()[:32]


def tokenize(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_length: int) -> dict[str, torch.Tensor]:
    """``{"offsets": int64[n+1], "input_ids": int32[total], ["token_type_ids": int32[total]]}``:
    example i's ids are ``input_ids[offsets[i]:offsets[i+1]]``."""
    columns = [list(column) for column in zip(*texts)]
    encoded = tokenizer(*columns, truncation=True, max_length=max_length)
    ids = encoded["input_ids"]
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
    out = {"offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])}
    for field in FIELDS:
        if field in encoded:
            out[field] = torch.tensor(list(itertools.chain.from_iterable(encoded[field])), dtype=torch.int32)
    return out


def cached_tokenize(tokenizer: Any, texts: Sequence[tuple[str, ...]], max_length: int,
                    cache_dir: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """:func:`tokenize`, read from ``cache_dir`` when it was done before (None: no cache)."""
    if cache_dir is None:
        return tokenize(tokenizer, texts, max_length)
    path = Path(cache_dir).expanduser() / f"{fingerprint(tokenizer, texts, max_length)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: tokenize again and replace it
            pass
    arrays = tokenize(tokenizer, texts, max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(arrays, tmp)
    os.replace(tmp, path)
    return arrays
