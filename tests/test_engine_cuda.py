"""The engine on a GPU (skipped without CUDA): device pick, loader workers with pinned memory,
bf16 autocast and fp16 with a GradScaler through GeN, evaluation, checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_run_trains_digits_with_gen_and_auto_loader_workers(compose_cfg, tmp_path, precision):
    from genrun.engine import train
    from genrun.runtime import loader_workers

    cfg = compose_cfg(["trainer.device=cuda", f"trainer.precision={precision}", "trainer.max_steps=60",
                       "trainer.progress=off", "logger=none"])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["device"] == "cuda:0" and summary["step"] == 60
    assert summary["final"]["test"]["acc"] > 0.7 and summary["gen"]["probes"] == 15
    assert loader_workers("auto", torch.device("cuda", 0), 1) >= 1  # workers fed this run
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 60
