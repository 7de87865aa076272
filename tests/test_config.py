"""Every option of every config group composes, validates and builds (no training)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import CONF, options
from genrun.errors import UserError
from genrun.optim import REGISTRY, build_optimizer
from genrun.validate import models_for, validate

SMALL_TASKS = ["digits", "mnist5k"]


def test_groups_have_the_contracted_options():
    assert {"sgd", "adamw", "adam", "adagrad", "rmsprop"} <= set(options("optim"))
    assert {f"gen_{b}" for b in ("sgd", "adamw", "adam", "adagrad", "rmsprop")} <= set(options("optim"))
    assert set(options("sched")) == {"constant", "linear", "cosine", "invsqrt", "inv", "step", "exp", "warmup_cosine",
                                     "warmup_linear", "warmup_constant"}
    assert {"csv", "wandb", "none"} <= set(options("logger"))


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes_and_builds(compose_cfg, task, tmp_path):
    cfg = compose_cfg([f"task={task}"])
    overrides = [f"task={task}"]  # no model=: each task brings a model that fits it
    if "data_dir" in cfg.task:  # point downloadable tasks at an empty dir: building must not read data
        overrides.append(f"task.data_dir={tmp_path}")
    cfg = compose_cfg(overrides)
    validate(cfg)
    assert cfg.model._target_ in {compose_cfg([f"model={m}"]).model._target_ for m in models_for(cfg.task)}
    built = instantiate(cfg.task)
    assert built.name == cfg.task.name == task
    if "num_classes" in cfg.task:  # classification tasks: the model's head is sized from these
        assert built.num_classes == cfg.task.num_classes and built.in_channels == cfg.task.in_channels


@pytest.mark.parametrize("task, model", [("rosenbrock", "point"), ("synthetic_seqrec", "bert4rec"),
                                         ("synthetic_e2e", "gpt2_tiny"), ("digits", "small_cnn")])
def test_a_task_brings_its_model_and_model_on_the_command_line_wins(compose_cfg, task, model):
    own = compose_cfg([f"task={task}"])
    assert own.model._target_ == compose_cfg([f"task={task}", f"model={model}"]).model._target_
    other = "small_cnn" if model != "small_cnn" else "point"
    assert compose_cfg([f"task={task}", f"model={other}"]).model._target_ != own.model._target_


@pytest.mark.parametrize("task", SMALL_TASKS)
def test_offline_tasks_load_real_data_with_a_fixed_split(compose_cfg, task):
    cfg = compose_cfg([f"task={task}"])
    train_a, evals_a = instantiate(cfg.task).datasets()
    train_b, evals_b = instantiate(cfg.task).datasets()
    x, y = train_a[:]
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.shape[1] == 1
    assert set(y.tolist()) == set(range(10))
    assert torch.equal(evals_a["test"][:][1], evals_b["test"][:][1])
    total = len(train_a) + len(evals_a["test"])
    assert len(evals_a["test"]) == math.ceil(0.2 * total)  # scikit-learn rounds the test share up


# point: test_synthetic; bert4rec: test_recsys; text models: test_nlu, test_nlg; mask_rcnn: test_detection;
# dcgan: test_gan
OTHER_FAMILIES = ("point", "bert4rec", "minilm", "roberta_base", "mask_rcnn", "gpt2", "gpt2_tiny", "dcgan")


@pytest.mark.parametrize("model", [m for m in options("model") if m not in OTHER_FAMILIES])
@pytest.mark.parametrize("task", SMALL_TASKS)
def test_every_model_composes_and_runs_forward(compose_cfg, model, task):
    cfg = compose_cfg([f"model={model}", f"task={task}"])
    validate(cfg)
    net = instantiate(cfg.model)
    side = 8 if task == "digits" else 28
    assert net(torch.zeros(2, cfg.task.in_channels, side, side)).shape == (2, cfg.task.num_classes)


@pytest.mark.parametrize("optim", options("optim"))
def test_every_optimizer_composes_and_builds(compose_cfg, optim):
    cfg = compose_cfg([f"optim={optim}"])
    validate(cfg)
    assert cfg.optim.name in REGISTRY
    assert ("gen" in cfg.optim) == optim.startswith("gen_")
    net = instantiate(cfg.model)
    opt, _ = build_optimizer(cfg.optim, net)
    assert all(group["lr"] == cfg.optim.lr for group in opt.param_groups)
    # norms and biases are kept out of weight decay
    decays = sorted(group["weight_decay"] for group in opt.param_groups)
    assert decays[0] == 0.0


def test_gen_settings_are_shared_by_every_gen_optimizer(compose_cfg):
    settings = {opt: compose_cfg([f"optim={opt}"]).optim.gen for opt in options("optim") if opt.startswith("gen_")}
    first = next(iter(settings.values()))
    assert all(s == first for s in settings.values())
    assert first.every == 4 and first.smoothing == 0.9


@pytest.mark.parametrize("sched", options("sched"))
def test_every_schedule_composes_and_decays_from_c0(compose_cfg, sched):
    cfg = compose_cfg([f"sched={sched}", "optim=sgd"])
    validate(cfg)
    factor = instantiate(cfg.sched)
    total = 100
    values = [factor(t, total=total) for t in range(total + 1)]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
    if not sched.startswith("warmup_"):
        assert values[0] == 1.0
    assert max(values) == pytest.approx(1.0)
    if sched not in ("constant", "warmup_constant"):
        assert values[-1] < 0.5


def test_schedule_values_match_table_8(compose_cfg):
    def factor(name):
        return instantiate(compose_cfg([f"sched={name}"]).sched)

    assert factor("linear")(25, total=100) == pytest.approx(0.75)
    assert factor("cosine")(50, total=100) == pytest.approx(0.5)
    assert factor("invsqrt")(3, total=100) == pytest.approx(0.5)
    assert factor("inv")(3, total=100) == pytest.approx(0.25)
    assert factor("step")(80, total=100) == pytest.approx(0.01)
    assert factor("exp")(100, total=100) == pytest.approx(0.01)
    warm = factor("warmup_cosine")
    assert warm(0, total=100) == 0.0 and warm(5, total=100) == pytest.approx(1.0)
    steady = factor("warmup_constant")  # warm-up over 5 % of T from 0.001, then flat
    assert steady(0, total=100) == pytest.approx(0.001) and steady(5, total=100) == steady(100, total=100) == 1.0


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_composes(compose_cfg, logger):
    cfg = compose_cfg([f"logger={logger}"])
    validate(cfg)
    assert cfg.logger._target_.startswith("genrun.sinks.")


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes(compose_cfg, experiment):
    validate(compose_cfg([f"+experiment={experiment}"]))


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.gen.every=0", "optim.gen.every"),
        ("optim.gen.smoothing=1.5", "optim.gen.smoothing"),
        ("trainer.batch_size=-1", "trainer.batch_size"),
        ("optim.gen.horizon=bogus", "optim.gen.horizon"),
        ("optim.gen.points=[0]", "optim.gen.points"),
        ("optim.gen.max_change=0.5", "optim.gen.max_change"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.gen.points=[-1,nan,1]", "optim.gen.points"),
        ("optim.gen.points=[1,1]", "optim.gen.points"),
        ("optim.gen.min_r2=-inf", "optim.gen.min_r2"),
        ("trainer.average=inf", "trainer.average"),
        ("optim.momentum=nan", "optim.momentum"),
        ("trainer.eval_epochs=sometimes", "trainer.eval_epochs"),
        ("trainer.eval_splits=dev", "trainer.eval_splits"),
        ("trainer.eval_splits=[]", "trainer.eval_splits"),
        ("trainer.eval_limit=0", "trainer.eval_limit"),
        ("trainer.eval_limit=true", "trainer.eval_limit"),
        ("optim.gen.guard=maybe", "optim.gen.guard"),
    ],
)
def test_invalid_values_name_the_key_and_the_allowed_values(compose_cfg, override, key):
    with pytest.raises(UserError) as err:
        validate(compose_cfg([override]))
    message = str(err.value)
    assert message.startswith(f"{key}=") and "must be" in message and "\n" not in message


def test_guard_rules_by_name_validate_and_reach_gen(compose_cfg):
    from omegaconf import OmegaConf

    from genrun.gen import GeN

    cfg = compose_cfg(["optim.gen.guard=[backtrack,cap,keep]"])
    validate(cfg)
    gen = GeN(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
              **OmegaConf.to_container(cfg.optim.gen, resolve=True))
    assert gen.rules == {"backtrack", "cap", "keep"}
    with pytest.raises(UserError, match=r"optim.gen: guard has unknown rules \['recovr'\]: choose from .*recover"):
        validate(compose_cfg(["optim.gen.guard=[backtrack,recovr]"]))


def test_points_without_the_slope_need_two_non_zero_multipliers(compose_cfg):
    with pytest.raises(UserError, match=r"optim.gen.points=\[0, 1\] with optim.gen.slope=false needs two non-zero"):
        validate(compose_cfg(["optim.gen.points=[0,1]", "optim.gen.slope=false"]))


def test_unknown_gen_setting_is_named(compose_cfg):
    with pytest.raises(UserError, match=r"optim.gen.evry is not a GeN setting; did you mean optim.gen.every\?"):
        validate(compose_cfg(["+optim.gen.evry=3"]))


def test_gen_settings_that_exclude_each_other_are_named_before_any_job(compose_cfg, genrun, tmp_path):
    named = r"optim.gen: .*\(this run: optim.gen.probe=next, .*optim.gen.init_search=True\)"
    with pytest.raises(UserError, match=named):
        validate(compose_cfg(["optim.gen.probe=next", "optim.gen.init_search=true"]))
    proc = genrun("-m", "optim.gen.probe=same,next", "optim.gen.init_search=true", "+experiment=fast",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr  # job 0 would have run: none did
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        # Hydra suggests `+key=value` for an unknown key; the engine would then ignore it
        (["+trainer.max_epochs=3"], "trainer.max_epochs is not a trainer setting; did you mean trainer.epochs?"),
        (["+optim.momentm=0.9"], "optim.momentm is not an argument of torch.optim.SGD; did you mean optim.momentum?"),
        (["optim=dog", "+optim.init_eata=1e-6"],
         "optim.init_eata is not an argument of dog.DoG; did you mean optim.init_eta?"),
        # a schedule would take it only at its first call, mid-start; a model or logger at instantiate
        (["optim=sgd", "sched=cosine", "+sched.warmup=3"],
         "sched.warmup is not an argument of genrun.sched.cosine (it takes: nothing)"),
        (["optim=sgd", "sched=warmup_cosine", "+sched.warmpu=3"], "did you mean sched.warmup?"),
        (["+model.widht=8"], "model.widht is not an argument of genrun.models.SmallCNN; did you mean model.width?"),
        (["logger=wandb", "+logger.projet=x"],
         "logger.projet is not an argument of genrun.sinks.WandbSink; did you mean logger.project?"),
        (["optim.name=sgdd"], "optim.name=sgdd is not a known optimizer; did you mean optim.name=sgd?"),
    ],
)
def test_keys_nothing_would_read_are_named_with_the_closest_valid_one(compose_cfg, overrides, message):
    with pytest.raises(UserError) as err:
        validate(compose_cfg(overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_key_a_target_takes_through_kwargs_is_not_second_guessed(compose_cfg):
    # timm/torchvision-style factories that take **kwargs are passed whatever the user adds
    from genrun.validate import _check_keys_taken

    _check_keys_taken("model", ["anything"], lambda arch, **kwargs: None, "f", set())
    with pytest.raises(UserError, match="model.anything is not an argument of f"):
        _check_keys_taken("model", ["anything"], lambda arch: None, "f", set())


@pytest.mark.parametrize("preset, row", [
    (d.name.removesuffix("_row"), r.stem) for d in sorted((CONF / "experiment").glob("*_row"))
    for r in sorted(d.glob("*.yaml"))])
def test_every_experiment_row_validates(compose_cfg, preset, row):
    # rows set optimizer and schedule arguments: each must be one its target takes
    validate(compose_cfg([f"+experiment={preset}", f"experiment/{preset}_row={row}"]))


@pytest.mark.parametrize("cell", [c.stem for c in sorted((CONF / "experiment" / "gen_suite_cell").glob("*.yaml"))])
def test_every_gen_suite_cell_composes_with_every_kind_of_row(compose_cfg, cell):
    base = {}
    for row in ("const_1", "sched_4", "gen", "gen_div1000", "prodigy", "sf"):
        cfg = compose_cfg(["+experiment=gen_suite", f"experiment/gen_suite_cell={cell}",
                           f"experiment/gen_suite_row={row}"])
        validate(cfg)
        suite = cfg.gen_suite
        assert suite.cell == cell and suite.row == row and len(suite.grid) == 4
        assert list(suite.grid) == sorted(suite.grid) and suite.starts.div10 < suite.starts.x1 < suite.starts.x10
        if row.startswith("const") or row.startswith("sched"):
            base.setdefault("name", cfg.optim.name)
            assert cfg.optim.name == base["name"] and "gen" not in cfg.optim
            assert cfg.optim.lr == suite.grid[int(row[-1]) - 1]
            assert (cfg.sched._target_ == "genrun.sched.constant") is row.startswith("const")
        elif row.startswith("gen"):
            start = {"gen": "x1", "gen_div1000": "div1000"}[row]
            assert cfg.optim.name == base["name"] and cfg.optim.gen.probe == "same" and cfg.optim.gen.guard
            assert cfg.optim.lr == suite.starts[start]
        elif row == "prodigy":
            assert cfg.optim.name == "prodigy" and cfg.optim.lr == 1.0
        else:
            assert cfg.optim.name == suite.sf.name and cfg.optim.name.startswith("sf_") and cfg.optim.lr > 0


@pytest.mark.parametrize("preset", options("optim/gen"))
def test_every_gen_preset_composes_and_builds_gen(compose_cfg, preset):
    from omegaconf import OmegaConf

    from genrun.gen import GeN

    cfg = compose_cfg(["optim=gen_adamw", f"optim/gen={preset}"])
    validate(cfg)
    kwargs = OmegaConf.to_container(cfg.optim.gen, resolve=True)
    opt, _ = build_optimizer(cfg.optim, instantiate(cfg.model))
    gen = GeN(opt, **kwargs, total_steps=100)  # the engine passes T: the default horizon needs it
    assert gen.every == cfg.optim.gen.every and tuple(gen.points) == tuple(cfg.optim.gen.points)
    assert gen.horizon == ("none" if preset == "algorithm1" else "cosine")
    if preset == "algorithm1":  # the preset and the classmethod are one setting
        assert all(getattr(gen, k) == getattr(GeN.algorithm1(opt), k) for k in ("points", "slope", "min_r2",
                                                                               "max_change", "guard", "probe"))


def test_the_guard_ablation_sweeps_the_default_and_each_rule_left_out_once():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from genrun.gen import GUARD_RULES

    params = OmegaConf.load(CONF / "experiment" / "gen_suite_ablation.yaml").hydra.sweeper.params
    swept = OverridesParser.create().parse_overrides([f"optim.gen.guard={params['optim.gen.guard']}"])[0]
    settings = list(swept.sweep_iterator())
    assert settings[0] is True and len(settings) == 1 + len(GUARD_RULES)
    left_out = [set(GUARD_RULES) - set(s) for s in settings[1:]]
    assert all(len(s) == 1 for s in left_out) and set().union(*left_out) == set(GUARD_RULES)
