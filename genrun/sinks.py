"""Metric sinks for the engine's train / eval / GeN-probe records. Sinks take whole
records (dicts with ``kind`` and ``step``), so each backend picks its own layout. The
engine always writes JsonlSink; ``logger=`` (csv / wandb / none) adds one more.

A sink may also take an evaluation's decoded examples, ``examples(split, step, rows)``
(optional: the engine skips a sink without it): JsonlSink writes them to
``predictions/<split>_step<step>.jsonl``, WandbSink logs a few as a table."""

import csv
import inspect
import io
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from genrun import atomic

KINDS = ("train", "eval", "gen")
PREDICTIONS = "predictions"  # the run dir's folder of decoded examples
TABLE_ROWS = 20  # examples per W&B table: a sample to read, not the split


@runtime_checkable
class Sink(Protocol):
    """What the engine codes against: records go in, ``close`` ends the run."""

    def log(self, record: Mapping[str, Any]) -> None: ...

    def close(self, status: str = "finished") -> None: ...


def _kind(record: Mapping[str, Any]) -> str:
    # Fail loudly: an unknown kind would otherwise be routed to the wrong file.
    kind = record.get("kind")
    if kind not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
    return kind


def _clean(value: Any) -> Any:
    """Strict-JSON-safe copy: non-finite floats become None (``json.dumps`` writes
    NaN/Infinity, which strict readers reject); numpy/torch values go via tolist()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "tolist"):
        return _clean(value.tolist())
    return str(value)


class NullSink:
    """``logger=none``: accepts and drops everything."""

    def log(self, record: Mapping[str, Any]) -> None:
        pass

    def examples(self, split: str, step: int, rows: list[Mapping[str, Any]]) -> None:
        pass

    def close(self, status: str = "finished") -> None:
        pass


class _FileSink:
    """A ``metrics`` and a ``gen`` stream, opened by the subclass's ``_open``. Logging
    after close raises ValueError (closed file); closing twice is a no-op."""

    suffix = ""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._files = {n: self._open(self.run_dir / f"{n}.{self.suffix}") for n in ("metrics", "gen")}

    def _stream(self, record: Mapping[str, Any]) -> Any:
        return self._files["gen" if _kind(record) == "gen" else "metrics"]

    def examples(self, split: str, step: int, rows: list[Mapping[str, Any]]) -> None:
        pass  # JsonlSink (always there) writes them; CSV would only repeat them worse

    def close(self, status: str = "finished") -> None:
        # every file is closed even when one cannot flush (a full disk); the first error then propagates
        errors = []
        for f in self._files.values():
            try:
                f.close()
            except OSError as err:
                errors.append(err)
        if errors:
            raise errors[0]


class JsonlSink(_FileSink):
    """Train/eval records to ``metrics.jsonl``, gen records to ``gen.jsonl``. Append +
    flush per line (not fsync: surviving the process dying is what matters): a killed
    run keeps its lines and a resumed run continues the same files."""

    suffix = "jsonl"

    def _open(self, path: Path) -> Any:
        # A killed run may have left a torn last line: end it so the next record starts
        # on its own line (readers skip the torn one). "a+": peek allowed, writes append.
        f = open(path, "a+b")
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        return f

    def log(self, record: Mapping[str, Any]) -> None:
        f = self._stream(record)
        f.write(json.dumps(_clean(record), allow_nan=False).encode() + b"\n")  # allow_nan: a guard
        f.flush()

    def examples(self, split: str, step: int, rows: list[Mapping[str, Any]]) -> None:
        """``predictions/<split>_step<step>.jsonl``, one object per example, whole or not at all."""
        folder = self.run_dir / PREDICTIONS
        folder.mkdir(exist_ok=True)
        atomic.write_text(folder / f"{split}_step{step}.jsonl",
                          "".join(json.dumps(_clean(row), ensure_ascii=False) + "\n" for row in rows))


class _CsvFile:
    """A CSV whose header grows: columns in first-seen order, rows appended and flushed
    one by one; a new key rewrites the file once with the widened header (temp file +
    atomic rename), so it is valid CSV at every moment. New keys are rare (typically
    the first eval row). On resume the existing header seeds the columns."""

    def __init__(self, path: Path) -> None:
        self.path, self.columns = path, []
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), [])
        self._reopen()

    def _reopen(self) -> None:
        self._f = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._f, self.columns)

    def write(self, row: Mapping[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new or self._f.tell() == 0:
            self._rewrite(self.columns + new)
        self._writer.writerow(row)
        self._f.flush()

    def _rewrite(self, columns: list[str]) -> None:
        self._f.close()
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(self.path, text.getvalue())  # a full disk keeps the old file
        self.columns = columns
        self._reopen()

    def close(self) -> None:
        self._f.close()


class CsvSink(_FileSink):
    """``logger=csv``: ``metrics.csv`` (train + eval rows, told apart by ``kind``) and
    ``gen.csv``. ``lr`` becomes ``lr_group0``, ``lr_group1``, ...; other lists (a probe's
    ``points``/``losses``) are JSON text in one cell; None and NaN are empty cells."""

    suffix = "csv"
    _open = staticmethod(_CsvFile)

    def log(self, record: Mapping[str, Any]) -> None:
        stream, kind = self._stream(record), record["kind"]
        row: dict[str, Any] = {}
        for key, value in _clean(record).items():
            if key == "lr" and kind != "gen":
                lrs = value if isinstance(value, list) else [value]
                row.update({f"lr_group{i}": lr for i, lr in enumerate(lrs)})
            else:
                row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        stream.write(row)


def _scalar(value: Any) -> float | int | None:
    """A W&B-plottable number (bools as 0/1; NaN kept, W&B shows it), or None to skip."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy/torch scalar
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, (int, float)) else None


def wandb_payload(record: Mapping[str, Any]) -> dict[str, Any]:
    """Map a record to W&B keys, always with ``step``; None and non-numbers are dropped."""
    kind, out = _kind(record), {}
    if kind == "train":
        for key, value in record.items():
            if key == "lr":
                lrs = value if isinstance(value, (list, tuple)) else [value]
                out.update({f"train/lr/group{i}": v for i, v in enumerate(lrs)})
            elif key not in ("kind", "step"):
                out[f"train/{key}"] = value
    elif kind == "eval":
        split = record.get("split") or "eval"
        for key, value in record.items():
            if key not in ("kind", "step", "split", "epoch"):  # epoch is on train/
                out[f"eval/{split}/{key}"] = value
    else:  # gen: a fixed set of probe series; gen/lr is the lr in use after the probe
        out = {f"gen/{k}": record.get(k) for k in ("eta_star", "A", "b", "r2", "accepted")}
        lr = record.get("lr_after")
        out["gen/lr"] = lr if lr is not None else record.get("lr_before")
    payload = {k: _scalar(v) for k, v in out.items() if _scalar(v) is not None}
    payload["step"] = int(record["step"])
    return payload


def _cell(value: Any) -> Any:
    """A W&B table cell: a text or number as it is, a list of texts (references) one per line."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return json.dumps(_clean(value), ensure_ascii=False)


class WandbSink:
    """``logger=wandb``: one W&B run per sink, its files under ``run_dir/wandb/``.

    ``reinit="create_new"``: each sink owns its run, so multirun jobs run in one process
    (Hydra's basic launcher) get a W&B run each, and a run left open by a crashed job is
    neither handed back to nor finished by the next; calls go through the run object, as
    ``create_new`` sets no ``wandb.log`` globals. ``finish`` only informs wandb-core, which
    flushes the offline ``.wandb`` file a moment later (at the latest at interpreter exit).

    The run id is kept in ``run_dir/wandb/run-id``; ``resume=True`` (the engine passes it for
    ``trainer.resume``) continues that W&B run (``resume="allow"``) instead of starting another.
    Steps logged after the last checkpoint and before the stop are logged again by the resumed
    run, so W&B holds them twice (``metrics.jsonl`` drops the old ones)."""

    def __init__(self, run_dir: str | os.PathLike, *, project: str = "genrun",
                 entity: str | None = None, mode: str = "offline", group: str | None = None,
                 name: str | None = None, tags: Iterable[str] = (),
                 config: Mapping[str, Any] | None = None, job_type: str | None = None,
                 resume: bool = False) -> None:
        import wandb  # lazily: slow to import, and only this sink needs it
        from omegaconf import DictConfig, OmegaConf
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # older wandb: missing dir -> tempdir
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        id_file = self.run_dir / "wandb" / "run-id"
        previous = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(project=project, entity=entity, mode=mode, group=group, name=name,
                              tags=list(tags), config=dict(config or {}), job_type=job_type,
                              dir=str(self.run_dir), reinit="create_new",
                              id=previous, resume="allow" if previous else None)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run.id + "\n")
        # Plot all series against the optimizer step, not W&B's per-log-call counter.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, record: Mapping[str, Any]) -> None:
        if self.run is None:
            raise RuntimeError("WandbSink.log called after close")
        self.run.log(wandb_payload(record))

    def images(self, step: int, images: Mapping[str, str | os.PathLike]) -> None:
        """Each image file as ``images/<name>`` at ``step`` (the files stay where the task wrote them)."""
        import wandb

        if self.run is None:
            raise RuntimeError("WandbSink.images called after close")
        self.run.log({**{f"images/{name}": wandb.Image(str(path)) for name, path in images.items()},
                      "step": int(step)})

    def examples(self, split: str, step: int, rows: list[Mapping[str, Any]]) -> None:
        """The first ``TABLE_ROWS`` examples as a table, ``eval/<split>/examples`` at ``step``."""
        import wandb

        if self.run is None:
            raise RuntimeError("WandbSink.examples called after close")
        columns = list(rows[0])
        data = [[_cell(row.get(c)) for c in columns] for row in rows[:TABLE_ROWS]]
        self.run.log({f"eval/{split}/examples": wandb.Table(columns=columns, data=data), "step": int(step)})

    def close(self, status: str = "finished") -> None:
        run, self.run = self.run, None  # detach first: a second close is a no-op
        if run is not None:
            run.finish(exit_code=0 if status == "finished" else 1)


def build_sink(cfg: Any, run_dir: str | os.PathLike, *, config: Any = None,
               group: str | None = None, name: str | None = None, resume: bool = False) -> Sink:
    """Instantiate the ``logger`` node (or a root config holding one; None -> NullSink).

    Runtime values go only to targets whose signature names them; a value set in the YAML
    or by an override (``+logger.group=x``) wins. ``_partial_`` keeps ``config`` out of
    OmegaConf, where it would be re-resolved and any ``_target_`` in it instantiated."""
    from hydra.utils import instantiate

    node = cfg.logger if cfg is not None and "_target_" not in cfg and "logger" in cfg else cfg
    if node is None:
        return NullSink()
    factory = instantiate(node, _partial_=True, _convert_="all")
    accepted = inspect.signature(factory).parameters
    runtime = {"run_dir": run_dir, "config": config, "group": group, "name": name, "resume": resume}
    kwargs = {k: v for k, v in runtime.items()
              if k in accepted and v is not None and factory.keywords.get(k) is None}
    return factory(**kwargs)
