"""The learning-rate-free baselines come from their packages, build from their YAML, and train."""

from __future__ import annotations

import math

import pytest

from genrun.engine import train
from genrun.optim import build_optimizer
from genrun.validate import validate

BASELINES = {  # conf/optim option -> the package class it must build
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "dadapt_sgd": "dadaptation.dadapt_sgd.DAdaptSGD",
    "dadapt_adamw": "dadaptation.dadapt_adam.DAdaptAdam",
    "sf_sgd": "schedulefree.sgd_schedulefree.SGDScheduleFree",
    "sf_adamw": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "dog": "dog.dog.DoG",
}
FAST = ["task=digits", "logger=none", "trainer.max_steps=6", "trainer.batch_size=64", "trainer.progress=off",
        "trainer.device=cpu", "trainer.eval_batch_size=512"]


@pytest.mark.parametrize("option", BASELINES)
def test_baseline_builds_its_package_class_and_trains(compose_cfg, option, tmp_path):
    cfg = compose_cfg([f"optim={option}", *FAST])
    validate(cfg)
    from hydra.utils import instantiate

    opt, spec = build_optimizer(cfg.optim, instantiate(cfg.model))
    assert f"{type(opt).__module__}.{type(opt).__name__}" == BASELINES[option]
    assert spec.has_modes == option.startswith("sf_")
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished" and summary["step"] == 6
    assert math.isfinite(summary["final"]["test"]["loss"])


def test_dadapt_settings_follow_the_paper(compose_cfg):
    from hydra.utils import instantiate

    cfg = compose_cfg(["optim=dadapt_adamw"])
    opt, _ = build_optimizer(cfg.optim, instantiate(cfg.model))
    assert all(group["decouple"] for group in opt.param_groups)  # AdamW-style decay
    sgd = compose_cfg(["optim=dadapt_sgd"]).optim
    assert sgd.weight_decay == 0.0 and sgd.momentum == 0.9  # B.2.2 removed the decay for this one


def test_schedule_free_is_switched_to_eval_for_evaluation_and_back(compose_cfg, tmp_path, monkeypatch):
    import schedulefree

    calls = []
    cls = schedulefree.SGDScheduleFree
    for mode in ("train", "eval"):
        original = getattr(cls, mode)
        monkeypatch.setattr(cls, mode, lambda self, _m=mode, _o=original: (calls.append(_m), _o(self))[1])
    cfg = compose_cfg(["optim=sf_sgd", *FAST, "trainer.eval_every=3"])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "finished"
    # train before the steps, eval before every evaluation (steps 3 and 6), train again after the one mid-run
    assert calls[0] == "train" and calls.count("eval") >= 2 and calls[calls.index("eval") + 1] == "train"


def test_a_diverging_baseline_is_recorded_as_diverged(compose_cfg, tmp_path):
    cfg = compose_cfg(["optim=sf_sgd", "optim.lr=1e12", *FAST])
    summary = train(cfg, tmp_path)
    assert summary["status"] == "diverged" and "loss is" in summary["message"]


@pytest.mark.parametrize("option", ["prodigy", "dadapt_sgd", "dadapt_adamw", "dog"])
def test_adaptive_baselines_log_the_step_they_adapt_not_their_multiplier(compose_cfg, option, tmp_path):
    import json

    cfg = compose_cfg([f"optim={option}", *FAST])
    train(cfg, tmp_path)
    lrs = [r["lr"][0] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert len(lrs) == 6 and all(math.isfinite(v) and v > 0 for v in lrs)
    assert cfg.optim.lr == 1.0 and lrs[-1] != 1.0 and len(set(lrs)) > 1  # the step moves; the multiplier does not


def test_step_size_of_a_param_group():
    import torch

    from genrun.optim import REGISTRY

    assert REGISTRY["prodigy"].lr_of({"lr": 0.5, "d": 1e-3}) == pytest.approx(5e-4)
    assert REGISTRY["dog"].lr_of({"lr": 1.0, "eta": [torch.tensor(0.02)] * 3}) == pytest.approx(0.02)
    assert REGISTRY["dog"].lr_of({"lr": 1.0}) == 1.0                # before DoG's first step
    assert REGISTRY["sgd"].lr_of({"lr": torch.tensor(0.1)}) == pytest.approx(0.1)


def _ckpt(run_dir):
    import torch

    return torch.load(run_dir / "ckpt.pt", weights_only=True)


def test_averaged_weights_follow_the_polynomial_decay_and_are_what_is_evaluated(compose_cfg, tmp_path):
    from functools import partial

    import torch
    from hydra.utils import instantiate

    from genrun.runtime import to_device

    gamma = 8.0
    base = ["optim=sgd", "sched=constant", *FAST, f"trainer.average={gamma}"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    first = train(compose_cfg([*base, "trainer.max_steps=1"]), one)
    summary = train(compose_cfg([*base, "trainer.max_steps=2"]), two)
    x1, x2, avg = _ckpt(one)["model"], _ckpt(two)["model"], _ckpt(two)["averager"]
    assert _ckpt(one)["averager"]["t"] == 2 and avg["t"] == 3  # the next step's t
    c = (1 + gamma) / (2 + gamma)
    for k, v in x2.items():
        expected = v if not v.is_floating_point() else (1 - c) * x1[k] + c * v
        torch.testing.assert_close(avg["av_model"][k], expected)
    assert any(not torch.equal(avg["av_model"][k], x2[k]) for k in x2 if x2[k].is_floating_point())
    # after one step x̄ = x_1; after two, evaluation reads x̄, not the last iterate
    assert first["final"]["test"]["loss"] == train(compose_cfg([*base[:-1], "trainer.max_steps=1"]), tmp_path)[
        "final"]["test"]["loss"]
    cfg = compose_cfg([*base, "trainer.max_steps=2"])
    task, model = instantiate(cfg.task), instantiate(cfg.model)
    _, eval_sets = task.datasets()
    loader = torch.utils.data.DataLoader(eval_sets["test"], batch_size=512)
    to_cpu = partial(to_device, device=torch.device("cpu"))
    model.load_state_dict(avg["av_model"])
    on_avg = task.evaluate(model.eval(), loader, to_cpu)
    model.load_state_dict(x2)
    on_last = task.evaluate(model.eval(), loader, to_cpu)
    assert summary["final"]["test"]["loss"] == pytest.approx(on_avg["loss"], rel=1e-6)
    assert on_avg["loss"] != pytest.approx(on_last["loss"], rel=1e-6)


def test_a_resumed_run_continues_its_average(compose_cfg, tmp_path):
    import torch

    base = ["optim=dog", *FAST, "trainer.average=8", "trainer.batch_size=256", "trainer.max_steps=null",
            "trainer.epochs=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    straight.mkdir(), stopped.mkdir()
    train(compose_cfg(base), straight)
    train(compose_cfg([*base[:-1], "trainer.epochs=1"]), stopped)  # the first epoch's checkpoint, as if killed
    resumed = train(compose_cfg([*base, f"trainer.resume={stopped}"]), stopped)
    a, b = _ckpt(straight)["averager"], _ckpt(stopped)["averager"]
    assert a["t"] == b["t"] == resumed["step"] + 1
    assert all(torch.equal(a["av_model"][k], b["av_model"][k]) for k in a["av_model"])


def test_only_the_dog_row_evaluates_averaged_weights(compose_cfg):
    for preset in ("table2", "table2_offline"):
        rows = {row: compose_cfg([f"+experiment={preset}", f"experiment/table2_row={row}"]).trainer.average
                for row in ("dog", "gen_sgd", "sgd_cosine", "prodigy")}
        assert rows == {"dog": 8.0, "gen_sgd": None, "sgd_cosine": None, "prodigy": None}
    assert compose_cfg([]).trainer.average is None
