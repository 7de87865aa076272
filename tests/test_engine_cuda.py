"""The engine on a GPU (skipped without CUDA): device pick, pinned memory with and without loader
workers, bf16 autocast and fp16 with a GradScaler through GeN, evaluation, checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision,workers", [("bf16", "auto"), ("fp16", 2)])
def test_cuda_run_trains_digits_with_gen(compose_cfg, tmp_path, precision, workers):
    from genrun.engine import train

    cfg = compose_cfg(["trainer.device=cuda", f"trainer.precision={precision}", f"trainer.num_workers={workers}",
                       "trainer.max_steps=60", "trainer.progress=off", "logger=none"])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["device"] == "cuda:0" and summary["step"] == 60
    assert summary["final"]["test"]["acc"] > 0.7 and summary["gen"]["probes"] == 15
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 60
