"""SYNTHETIC tasks (paper Section 5): function values and minima, configs, one short run per optimizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import hessian

from genrun.engine import train
from genrun.errors import UserError
from genrun.optim import REGISTRY
from genrun.tasks.synthetic import Beale, Point, Rosenbrock, beale, rosenbrock

F64 = torch.float64
OPTIMIZERS = ["sgd", "sgd_plain", "adam", "adagrad", "rmsprop", "adabelief", "adahessian",
              "gen_sgd", "gen_sgd_plain", "gen_adam", "gen_adagrad"]


def test_function_values_at_known_points():
    assert rosenbrock(1.0, 1.0) == 0.0
    assert rosenbrock(-1.5, 2.0) == pytest.approx(12.5)  # 100·0.25² + 2.5²
    assert rosenbrock(0.0, 0.0) == 1.0
    assert beale(3.0, 0.5) == 0.0
    assert beale(1.0, 1.5) == pytest.approx(41.25)  # 2² + 3.5² + 5²
    assert beale(0.0, 0.0) == pytest.approx(1.5**2 + 2.25**2 + 2.625**2)


@pytest.mark.parametrize("cls", [Rosenbrock, Beale])
def test_the_tensor_form_matches_the_formula_and_the_minimum_is_one(cls):
    task = cls()
    g = torch.Generator().manual_seed(0)
    for w in torch.rand(20, 2, generator=g, dtype=F64) * 6 - 3:
        assert float(task.value(w)) == pytest.approx(float(cls.function(float(w[0]), float(w[1]))), rel=1e-12)
        assert task.value_float(float(w[0]), float(w[1])) == pytest.approx(float(task.value(w)), rel=1e-12)
    w = torch.tensor(cls.minimum, dtype=F64, requires_grad=True)
    value = task.value(w)
    (grad,) = torch.autograd.grad(value, w)
    assert float(value.detach()) == cls.f_min and torch.allclose(grad, torch.zeros(2, dtype=F64))
    assert torch.linalg.eigvalsh(hessian(task.value)(w.detach())).min() > 0  # a strict local minimum


def test_beale_is_not_convex():
    # The paper calls Beale convex; its Hessian at (0, 0) has a negative eigenvalue.
    eig = torch.linalg.eigvalsh(hessian(Beale().value)(torch.zeros(2, dtype=F64)))
    assert eig.min() < 0 < eig.max()


def test_point_model_and_task_interface():
    task = Beale(start=[0.5, -1.0], iterations=7)
    model = Point(task.start)
    assert model().tolist() == [0.5, -1.0] and model.w.dtype == torch.float32
    assert Point([1, 2], dtype="float64").w.dtype == F64
    train_set, evals = task.datasets()
    assert len(train_set) == 7 and set(evals) == {"test"}
    assert float(task.loss(model, "ignored")) == pytest.approx(beale(0.5, -1.0), rel=1e-6)
    out = task.evaluate(model, None, None)
    assert out["objective"] == pytest.approx(beale(0.5, -1.0), rel=1e-6) and out["gap"] == out["objective"]
    assert set(task.step_metrics(model)) == {"x1", "x2", "objective"}
    assert Rosenbrock().start == (-1.5, 2.0) and Beale().start == (1.0, 1.5)
    with pytest.raises(UserError, match="task.start"):
        Point([1.0])
    with pytest.raises(UserError, match="task.iterations"):
        Rosenbrock(iterations=0)


def test_adahessian_asks_the_engine_for_create_graph():
    assert REGISTRY["adahessian"].create_graph and not REGISTRY["adabelief"].create_graph


@pytest.mark.parametrize("task", ["rosenbrock", "beale"])
def test_preset_composes_a_one_step_per_iteration_run(compose_cfg, task):
    cfg = compose_cfg(["+experiment=synthetic", f"task={task}", "optim=adam"])
    assert cfg.model._target_.endswith("synthetic.Point") and list(cfg.model.start) == list(cfg.task.start)
    assert cfg.trainer.batch_size == 1 and cfg.trainer.epochs == 1 and cfg.optim.weight_decay == 0.0
    assert cfg.task.iterations == 1000


def test_grid_preset_is_the_papers_protocol():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=synthetic_grid"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.task.name == "rosenbrock" and cfg.trainer.progress == "off"
    params = cfg.hydra.sweeper.params
    assert params["task"].split(",") == ["rosenbrock", "beale"]
    # the paper's Section 5 SGD is plain gradient descent (B.1 names no momentum)
    grid = ["sgd_plain", "adam", "adagrad", "rmsprop", "adabelief", "adahessian",
            "gen_sgd_plain", "gen_adam", "gen_adagrad"]
    assert sorted(params["optim"].split(",")) == sorted(grid)
    lrs = sorted(float(v) for v in params["optim.lr"].split(","))
    assert lrs == sorted(m * 10.0**-k for k in range(6) for m in (1, 2, 5))


def _short_run(compose_cfg, tmp_path, task: str, optim: str, *extra: str, iterations: int = 40):
    cfg = compose_cfg(["+experiment=synthetic", f"task={task}", f"optim={optim}", "trainer.progress=off",
                       f"task.iterations={iterations}", *extra])
    run_dir = tmp_path / f"{task}-{optim}"
    summary = train(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, records


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_one_short_run_per_optimizer(compose_cfg, tmp_path, optim):
    # a stable lr for every optimizer on Rosenbrock (SGD's default 0.05 diverges there)
    lr = "optim.lr=0.0002" if "sgd" in optim else "optim.lr=0.01"
    summary, records = _short_run(compose_cfg, tmp_path, "rosenbrock", optim, lr)
    assert summary["status"] == "finished" and summary["step"] == 40
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 41))  # one record per iteration
    assert all({"x1", "x2", "objective"} <= set(r) for r in train_recs)  # the trajectory
    final = summary["final"]["test"]
    assert math.isfinite(final["objective"]) and final["objective"] < 12.5  # below f(start)
    assert final["objective"] == pytest.approx(train_recs[-1]["objective"], rel=1e-5)
    assert [final["x1"], final["x2"]] == pytest.approx([train_recs[-1]["x1"], train_recs[-1]["x2"]])
    if optim.startswith("gen_"):
        assert summary["gen"]["probes"] == 10  # every 4th of 40 steps


@pytest.mark.parametrize("task", ["rosenbrock", "beale"])
@pytest.mark.parametrize("optim", ["gen_sgd_plain", "gen_adam", "gen_adagrad"])  # the synthetic grid's GeN rows
def test_gen_from_its_default_lr_with_the_guard_ends_far_below_the_start(compose_cfg, tmp_path, task, optim):
    summary, records = _short_run(compose_cfg, tmp_path, task, optim, "optim.gen.guard=true", iterations=1000)
    start = {"rosenbrock": 12.5, "beale": 41.25}[task]
    assert summary["status"] == "finished"
    assert math.isfinite(summary["final"]["test"]["objective"])
    assert summary["final"]["test"]["objective"] < 0.01 * start
