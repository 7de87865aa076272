"""Tests for genrun.sinks: JSONL/CSV files, the W&B sink (offline only) and build_sink."""

from __future__ import annotations

import csv
import json
import math
import struct
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import PATIENCE
from genrun.sinks import CsvSink, JsonlSink, NullSink, Sink, WandbSink, build_sink, wandb_payload

LOGGER_CONF = Path(__file__).resolve().parents[1] / "conf" / "logger"

TRAIN = {"kind": "train", "step": 1, "epoch": 0, "loss": 2.5, "lr": [0.1, 0.01]}
EVAL = {"kind": "eval", "step": 1, "epoch": 0, "split": "test", "loss": 2.0, "acc": 0.25}
GEN = {"kind": "gen", "step": 1, "lr_before": 0.1, "lr_after": 0.2, "eta_star": 0.2,
       "A": 3.0, "b": -1.2, "r2": 0.99, "accepted": True, "reason": None,
       "points": [-0.1, 0.0, 0.1], "losses": [2.6, 2.5, 2.45]}


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    # Belt and braces: no test may reach the network or write outside tmp_path.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir_env"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- JSONL


def test_jsonl_splits_by_kind_and_parses(tmp_path):
    sink = JsonlSink(tmp_path)
    for rec in (TRAIN, EVAL, GEN):
        sink.log(rec)
    # Flushed per record: readable before close.
    assert [r["kind"] for r in _lines(tmp_path / "metrics.jsonl")] == ["train", "eval"]
    sink.close()
    assert _lines(tmp_path / "metrics.jsonl") == [TRAIN, EVAL]
    assert _lines(tmp_path / "gen.jsonl") == [GEN]


def test_jsonl_non_finite_written_as_null(tmp_path):
    sink = JsonlSink(tmp_path)
    sink.log({**TRAIN, "loss": float("nan"), "lr": [float("inf"), 0.1], "gnorm": -math.inf})
    sink.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    # Strict parse: reject the NaN/Infinity literals Python's json would accept.
    rec = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert rec["loss"] is None and rec["gnorm"] is None and rec["lr"] == [None, 0.1]


def test_numpy_scalars_are_plain_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    rec = {**TRAIN, "loss": np.float32(0.5), "lr": np.array([0.1, np.nan]), "ok": np.bool_(True)}
    sink = JsonlSink(tmp_path)
    sink.log(rec)
    sink.close()
    assert _lines(tmp_path / "metrics.jsonl") == [{**TRAIN, "loss": 0.5, "lr": [0.1, None], "ok": True}]
    # W&B gets numbers too (a dropped numpy scalar would silently lose a series).
    payload = wandb_payload({**rec, "lr": [np.float64(0.1)]})
    assert payload["train/loss"] == 0.5 and payload["train/ok"] == 1 and payload["train/lr/group0"] == 0.1


def test_jsonl_resume_appends_and_isolates_torn_line(tmp_path):
    first = JsonlSink(tmp_path)
    first.log(TRAIN)
    first.close()
    # Simulate a kill in the middle of a write.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "tra')
    resumed = JsonlSink(tmp_path)
    resumed.log({**TRAIN, "step": 2})
    resumed.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0])["step"] == 1 and json.loads(lines[2])["step"] == 2


def test_jsonl_rejects_unknown_kind_and_log_after_close(tmp_path):
    sink = JsonlSink(tmp_path)
    with pytest.raises(ValueError):
        sink.log({"kind": "summary", "step": 0})
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError):  # closed file: never silently dropped
        sink.log(TRAIN)


# ---------------------------------------------------------------- CSV


def test_csv_expands_lr_and_adds_late_columns(tmp_path):
    sink = CsvSink(tmp_path)
    sink.log(TRAIN)
    sink.log(EVAL)  # brings split/acc: header must be widened
    sink.log({**TRAIN, "step": 2, "loss": float("nan"), "gnorm": 1.5})  # another late column
    sink.log(GEN)
    rows = _csv(tmp_path / "metrics.csv")  # valid before close (flushed, header rewritten)
    sink.close()
    assert rows == _csv(tmp_path / "metrics.csv")
    header = list(rows[0])
    assert header[:6] == ["kind", "step", "epoch", "loss", "lr_group0", "lr_group1"]
    assert {"split", "acc", "gnorm"} <= set(header) and "lr" not in header
    assert [r["kind"] for r in rows] == ["train", "eval", "train"]
    assert rows[0]["lr_group1"] == "0.01" and rows[0]["acc"] == "" and rows[0]["gnorm"] == ""
    assert rows[1]["acc"] == "0.25" and rows[1]["split"] == "test"
    assert rows[2]["gnorm"] == "1.5" and rows[2]["loss"] == ""  # NaN -> empty cell
    with pytest.raises(ValueError):
        sink.log(TRAIN)
    (gen,) = _csv(tmp_path / "gen.csv")
    assert json.loads(gen["points"]) == GEN["points"] and gen["accepted"] == "True"


def test_csv_resume_keeps_header_and_appends(tmp_path):
    first = CsvSink(tmp_path)
    first.log(TRAIN)
    first.log(EVAL)
    first.close()
    resumed = CsvSink(tmp_path)
    resumed.log({**TRAIN, "step": 2})  # lacks split/acc: the old header must survive
    resumed.log({**EVAL, "step": 2, "f1": 0.5})  # and still grow
    resumed.close()
    rows = _csv(tmp_path / "metrics.csv")
    assert [(r["kind"], r["step"]) for r in rows] == [("train", "1"), ("eval", "1"),
                                                      ("train", "2"), ("eval", "2")]
    assert rows[1]["acc"] == "0.25" and rows[3]["f1"] == "0.5" and rows[1]["f1"] == ""
    assert (tmp_path / "metrics.csv").read_text().count("kind,step") == 1


def test_null_sink_accepts_records():
    sink = NullSink()
    assert isinstance(sink, Sink)
    for rec in (TRAIN, EVAL, GEN, {"kind": "anything"}):
        sink.log(rec)
    sink.close("failed")
    sink.close()


# ---------------------------------------------------------------- W&B


def test_wandb_payload_mapping():
    assert wandb_payload(TRAIN) == {"step": 1, "train/epoch": 0, "train/loss": 2.5,
                                    "train/lr/group0": 0.1, "train/lr/group1": 0.01}
    assert wandb_payload(EVAL) == {"step": 1, "eval/test/loss": 2.0, "eval/test/acc": 0.25}
    assert wandb_payload(GEN) == {"step": 1, "gen/eta_star": 0.2, "gen/A": 3.0, "gen/b": -1.2,
                                  "gen/r2": 0.99, "gen/accepted": 1, "gen/lr": 0.2}
    # None values are dropped, not sent as nulls; lr falls back to lr_before.
    rejected = {**GEN, "eta_star": None, "accepted": False, "lr_after": None}
    assert wandb_payload(rejected) == {"step": 1, "gen/A": 3.0, "gen/b": -1.2, "gen/r2": 0.99,
                                       "gen/accepted": 0, "gen/lr": 0.1}


def _wandb_records(path: Path):
    """Decode a .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte chunk
    headers) of wandb_internal_pb2.Record protobufs behind a 7-byte W&B header.
    wandb 0.31 ships no Python reader (the Go core writes it), so read it here."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, chunk_type = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        buf += data[pos:pos + length]
        pos += length
        if chunk_type in (1, 4):  # FULL or LAST chunk completes a record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _read_run(run_dir: Path, timeout: float = PATIENCE) -> dict:
    """Parse the offline run under run_dir/wandb. run.finish() only *informs* the
    wandb-core service (fire-and-forget); its writer flushes the .wandb file a
    moment later, so poll until the exit record is there."""
    deadline = time.monotonic() + timeout
    while True:
        (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        out = {"history": [], "metrics": [], "exit_code": None, "file": wandb_file}
        try:
            for rec in _wandb_records(wandb_file):
                kind = rec.WhichOneof("record_type")
                if kind == "run":
                    out["run"] = rec.run
                elif kind == "history":
                    # Keys arrive in `key` or `nested_key` depending on the SDK path.
                    items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                             for i in rec.history.item}
                    out["history"].append({k: v for k, v in items.items() if not k.startswith("_")})
                elif kind == "metric":
                    out["metrics"].append(rec.metric)
                elif kind == "exit":
                    out["exit_code"] = rec.exit.exit_code
        except Exception:  # noqa: BLE001 - a half-flushed tail; retry below
            pass
        if out["exit_code"] is not None or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def test_wandb_offline_run_under_run_dir(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    sink = WandbSink(run_dir, group="sweep-a", name="opt.lr=0.1", tags=("t1",),
                     config={"seed": 3, "opt": {"lr": 0.1}})
    for rec in (TRAIN, EVAL, GEN):
        sink.log(rec)
    sink.close()
    sink.close()  # second close is a no-op
    with pytest.raises(RuntimeError):
        sink.log(TRAIN)
    # dir=run_dir wins over WANDB_DIR.
    assert not list((tmp_path / "wandb_dir_env").rglob("*.wandb"))
    run = _read_run(run_dir)
    assert run["run"].run_group == "sweep-a" and run["run"].display_name == "opt.lr=0.1"
    assert list(run["run"].tags) == ["t1"]
    assert {i.key: json.loads(i.value_json) for i in run["run"].config.update}["seed"] == 3
    assert run["history"] == [wandb_payload(r) for r in (TRAIN, EVAL, GEN)]
    globs = {m.glob_name: m.step_metric for m in run["metrics"] if m.glob_name}
    assert globs == {"*": "step"}
    assert run["exit_code"] == 0


def test_wandb_failed_status_sets_exit_code(tmp_path):
    pytest.importorskip("wandb")
    sink = WandbSink(tmp_path)
    sink.log(TRAIN)
    sink.close("failed")
    sink.close("finished")  # must not re-finish with another code
    assert _read_run(tmp_path)["exit_code"] == 1


def test_two_sequential_wandb_sinks_are_distinct_runs(tmp_path):
    pytest.importorskip("wandb")
    ids = []
    for i in range(2):
        sink = WandbSink(tmp_path / f"job{i}", group="sweep", name=f"job{i}")
        sink.log({**TRAIN, "step": i})
        sink.close()
        run = _read_run(tmp_path / f"job{i}")
        assert run["run"].display_name == f"job{i}" and run["history"][0]["step"] == i
        ids.append(run["run"].run_id)
    assert ids[0] != ids[1]


def test_resumed_run_continues_its_wandb_run_and_a_fresh_one_does_not(tmp_path):
    pytest.importorskip("wandb")
    ids = []
    for resume in (False, True, False):
        sink = WandbSink(tmp_path, resume=resume)
        ids.append(sink.run.id)
        sink.close()
        assert (tmp_path / "wandb" / "run-id").read_text().strip() == ids[-1]
    assert ids[1] == ids[0] and ids[2] != ids[0]
    # the engine's flag reaches the sink through build_sink
    from omegaconf import OmegaConf

    node = OmegaConf.create({"_target_": "genrun.sinks.WandbSink"})
    sink = build_sink(node, tmp_path, resume=True)
    assert sink.run.id == ids[2]
    sink.close()


def test_unclosed_wandb_sink_does_not_capture_the_next_run(tmp_path):
    # A job that died without close() must neither be returned to the next job
    # (wandb's default "return_previous") nor be finished by it ("finish_previous").
    pytest.importorskip("wandb")
    leaked = WandbSink(tmp_path / "a", name="a")
    fresh = WandbSink(tmp_path / "b", name="b")
    assert fresh.run is not leaked.run and fresh.run.id != leaked.run.id
    leaked.log(TRAIN)  # still alive and logging to its own run
    fresh.log(EVAL)
    fresh.close()
    leaked.close("failed")
    a, b = _read_run(tmp_path / "a"), _read_run(tmp_path / "b")
    assert a["history"] == [wandb_payload(TRAIN)] and a["exit_code"] == 1
    assert b["history"] == [wandb_payload(EVAL)] and b["exit_code"] == 0


# ---------------------------------------------------------------- config + build_sink


def test_wandb_yaml_mode_follows_env(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    assert OmegaConf.load(LOGGER_CONF / "wandb.yaml").mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert OmegaConf.load(LOGGER_CONF / "wandb.yaml").mode == "online"


def test_logger_yamls_have_comment_and_target():
    names = sorted(p.stem for p in LOGGER_CONF.glob("*.yaml"))
    assert names == ["csv", "none", "wandb"]
    for name in names:
        text = (LOGGER_CONF / f"{name}.yaml").read_text()
        assert text.startswith("# ") and "_target_: genrun.sinks." in text


def test_build_sink_csv_and_none(tmp_path):
    sink = build_sink(OmegaConf.load(LOGGER_CONF / "csv.yaml"), tmp_path, config={"a": 1},
                      group="g", name="n")
    assert isinstance(sink, CsvSink) and sink.run_dir == tmp_path
    sink.log(TRAIN)
    sink.close()
    assert _csv(tmp_path / "metrics.csv")[0]["loss"] == "2.5"
    # A root config holding a `logger` node works too.
    root = OmegaConf.create({"logger": OmegaConf.load(LOGGER_CONF / "none.yaml")})
    assert isinstance(build_sink(root, tmp_path, group="g"), NullSink)
    assert isinstance(build_sink(None, tmp_path), NullSink)


def test_build_sink_wandb_passes_runtime_values(tmp_path):
    pytest.importorskip("wandb")
    cfg = OmegaConf.load(LOGGER_CONF / "wandb.yaml")
    cfg.tags = ["from-yaml"]
    # The run config may hold nested _target_ nodes and interpolations: they must
    # reach W&B as plain values, not be instantiated.
    run_cfg = OmegaConf.create({"lr": 0.5, "twice": "${lr}", "optim": {"_target_": "no.such.Class"}})
    sink = build_sink(cfg, tmp_path, config=run_cfg, group="sweep", name="lr=0.5")
    assert isinstance(sink, WandbSink)
    sink.log(TRAIN)
    sink.close()
    run = _read_run(tmp_path)
    assert run["file"].is_relative_to(tmp_path / "wandb")
    assert run["run"].run_group == "sweep" and run["run"].display_name == "lr=0.5"
    assert list(run["run"].tags) == ["from-yaml"]
    conf = {i.key: json.loads(i.value_json) for i in run["run"].config.update}
    assert conf["twice"] == 0.5 and conf["optim"] == {"_target_": "no.such.Class"}


def test_build_sink_yaml_group_wins_over_engine_default(tmp_path):
    pytest.importorskip("wandb")
    cfg = OmegaConf.load(LOGGER_CONF / "wandb.yaml")
    cfg.group = "my-group"
    sink = build_sink(cfg, tmp_path, group="sweep", name="n")
    sink.close()
    assert _read_run(tmp_path)["run"].run_group == "my-group"


def test_logger_group_composes_with_hydra(tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base=None, config_dir=str(LOGGER_CONF.parent)):
        cfg = compose(overrides=["+logger=wandb", "logger.mode=online"])
        assert cfg.logger.mode == "online" and cfg.logger.project == "genrun"  # not instantiated
        for option, cls in (("csv", CsvSink), ("none", NullSink)):
            sink = build_sink(compose(overrides=[f"+logger={option}"]), tmp_path / option)
            assert type(sink) is cls
            sink.close()


# ---------------------------------------------------------------- decoded examples

ROWS = [{"mr": f"name[Café {i}]", "prediction": f"café {i} is a pub.", "references": ["a £ ref", "another"]}
        for i in range(25)]


def test_jsonl_sink_writes_each_evaluations_examples_whole_and_the_others_ignore_them(tmp_path):
    sink = JsonlSink(tmp_path)
    sink.examples("dev", 7, ROWS)
    sink.close()
    path = tmp_path / "predictions" / "dev_step7.jsonl"
    assert _lines(path) == ROWS and "Café" in path.read_text(encoding="utf-8")
    assert not list((tmp_path / "predictions").glob("*.tmp"))
    for other in (CsvSink(tmp_path / "csv"), NullSink()):
        other.examples("dev", 7, ROWS)
        other.close()
    assert not (tmp_path / "csv" / "predictions").exists()


def test_wandb_sink_logs_a_table_of_the_first_examples_offline(tmp_path):
    pytest.importorskip("wandb")
    sink = WandbSink(tmp_path)
    sink.log(EVAL)
    sink.examples("test", 1, ROWS)
    sink.close()
    run = _read_run(tmp_path)
    assert run["exit_code"] == 0
    (logged,) = [h for h in run["history"] if "eval/test/examples/_type" in h]
    assert logged["eval/test/examples/_type"] == "table-file" and logged["step"] == 1
    (saved,) = tmp_path.glob(f"wandb/offline-run-*/files/{logged['eval/test/examples/path']}")
    table = json.loads(saved.read_text(encoding="utf-8"))
    assert table["columns"] == ["mr", "prediction", "references"] and len(table["data"]) == 20
    assert table["data"][0] == ["name[Café 0]", "café 0 is a pub.", "a £ ref\nanother"]
    with pytest.raises(RuntimeError):
        sink.examples("test", 2, ROWS)


def test_wandb_sink_shows_image_files_at_their_step_and_the_file_sinks_leave_them(tmp_path):
    pytest.importorskip("wandb")
    from PIL import Image

    png = tmp_path / "samples" / "step4.png"
    png.parent.mkdir()
    Image.new("RGB", (18, 10), (200, 30, 30)).save(png)
    sink = WandbSink(tmp_path)
    sink.log(EVAL)
    sink.images(4, {"samples": png})
    sink.close()
    run = _read_run(tmp_path)
    (logged,) = [h for h in run["history"] if "images/samples/_type" in h]
    assert logged["images/samples/_type"] == "image-file" and logged["step"] == 4
    assert (logged["images/samples/width"], logged["images/samples/height"]) == (18, 10)
    (saved,) = tmp_path.glob(f"wandb/offline-run-*/files/{logged['images/samples/path']}")
    with Image.open(saved) as image:
        assert image.size == (18, 10) and image.getpixel((0, 0)) == (200, 30, 30)
    assert png.is_file()  # the task's own file stays
    with pytest.raises(RuntimeError):
        sink.images(5, {"samples": png})
