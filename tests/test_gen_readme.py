"""The README's "GeN in your own training loop" example runs and does what it says."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## GeN in your own training loop"


def example_code() -> str:
    text = (ROOT / "README.md").read_text()
    assert HEADING in text, f"README.md lost its {HEADING!r} section"
    section = text.split(HEADING, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no ```python block under {HEADING!r}"
    return match.group(1)


def test_readme_example_runs_and_trains(capsys):
    code = example_code()
    assert len(code.strip().splitlines()) < 30
    scope: dict = {"__name__": "__readme__"}
    exec(compile(code, "README:GeN", "exec"), scope)
    gen = scope["gen"]
    assert scope["final"] < 0.3 * scope["first"]
    assert gen.history and any(r["accepted"] for r in gen.history)
    assert gen.lr > 10 * 1e-4  # GeN corrected the too-small initial lr
    assert "probes accepted" in capsys.readouterr().out


class ConstantLr:
    """The loop's GeN calls, answered by the plain optimizer at its constant lr."""

    def __init__(self, opt):
        self.opt, self.history = opt, [{"accepted": True}]

    def remember_rng(self):
        pass

    def step(self, closure, loss=None):
        self.opt.step()

    @property
    def lr(self):
        return self.opt.param_groups[0]["lr"]


def test_readme_example_with_the_defaults_beats_every_constant_lr_of_a_grid(capsys):
    code = example_code()
    made = "gen = GeN(opt, model=model, total_steps=300)"
    assert made in code and "lr=1e-4" in code  # the class defaults, from a too-small lr
    scope: dict = {"__name__": "__readme__"}
    exec(compile(code, "README:GeN", "exec"), scope)
    grid = {}
    for lr in (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        plain: dict = {"__name__": "__readme__", "ConstantLr": ConstantLr}
        exec(compile(code.replace(made, "gen = ConstantLr(opt)").replace("lr=1e-4", f"lr={lr}"), "README", "exec"),
             plain)
        grid[lr] = plain["final"]
    assert scope["final"] <= min(grid.values()), (scope["final"], grid)
