"""SYNTHETIC report: the paper's Section 5 (Figures 6-7, Appendix B.1) from a sweep of
`task=rosenbrock|beale` runs, e.g. `genrun -m +experiment=synthetic_grid`.

Per function it writes, into the output dir:

* ``synthetic_<function>.png``: the four panels of Figure 6/7. (1) objective gap vs
  iteration (log scale) for GeN-SGD and every baseline; (2) their trajectories on the
  contour plot, first 40 (Rosenbrock) / 60 (Beale) iterations; (3) each GeN-X (solid)
  against its base X (dashed); (4) their trajectories, first 180 / 40 iterations.
* rows of ``synthetic.md``: optimizer, chosen lr, final objective, iterations to reach
  1e-3 and 1e-6 above the minimum; and, when GeN ran from several initial lrs, how
  robust it is to η0.

Choosing the lr (the paper's B.1 protocol): a baseline is shown at the lr of its grid
with the smallest final objective (exact ties: the one that first reaches 1e-6, then
1e-3). A GeN variant is shown from its *default* initial lr (its base optimizer's
``optim.lr`` in conf/optim/, the one a user gets without tuning), else from the
only η0 it ran with, else from its best η0 (then marked so). A run that diverged, or
whose objective is not finite, has final objective ∞ and is never chosen over a finite one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from genrun import CONF_DIR
from genrun.report.runs import Run, pyplot, save_figure, train_series

#: The paper's trajectory snapshots (Figure 6: 40 and 180 iterations; Figure 7: 60 and 40).
TRAJECTORY_ITERS = {"rosenbrock": (40, 180), "beale": (60, 40)}
#: Thresholds of the table: iterations until f - f* ≤ this.
THRESHOLDS = (1e-3, 1e-6)
#: Display names and plot order; GeN-X pairs with X.
PRETTY = {"sgd": "SGD", "adam": "Adam", "adagrad": "AdaGrad", "rmsprop": "RMSprop",
          "adabelief": "AdaBelief", "adahessian": "AdaHessian", "adamw": "AdamW"}
ORDER = ["GeN-SGD", "GeN-Adam", "GeN-AdaGrad", "SGD", "Adam", "AdaGrad", "RMSprop", "AdaBelief", "AdaHessian"]
COLORS = {"SGD": "tab:blue", "Adam": "tab:orange", "AdaGrad": "tab:green", "RMSprop": "tab:red",
          "AdaBelief": "tab:purple", "AdaHessian": "tab:brown", "AdamW": "tab:pink"}
LOG_FLOOR = 1e-16  # a gap of exactly 0 is drawn here on the log axis
CONF_OPTIM = Path(CONF_DIR) / "optim"


def _is_synthetic(run: Run) -> bool:
    return str(run.cfg.get("task", {}).get("_target_", "")).startswith("genrun.tasks.synthetic.")


def applies(runs: list[Run]) -> bool:
    return any(_is_synthetic(run) for run in runs)


def _function(name: str):
    from genrun.tasks.synthetic import FUNCTIONS

    return FUNCTIONS[name]


@dataclass
class Curve:
    """One run as the report sees it: label, lr and the objective after each iteration."""

    run: Run
    function: str
    label: str
    base: str
    is_gen: bool
    lr: float

    @cached_property
    def task(self):
        return _function(self.function)(start=list(self.run.cfg.task.start))

    @cached_property
    def points(self) -> list[tuple[int, float, float, float]]:
        """(iteration, x1, x2, objective) from the start (iteration 0); ∞ once not finite."""
        import torch

        task = self.task
        start = torch.tensor(task.start, dtype=torch.float64)
        out = [(0, task.start[0], task.start[1], float(task.value(start)))]
        for step, rec in train_series(self.run, ("x1", "x2", "objective")):
            x1, x2, f = rec
            finite = all(v is not None and math.isfinite(v) for v in (x1, x2, f))
            out.append((step, x1 if finite else math.nan, x2 if finite else math.nan, f if finite else math.inf))
        return out

    @property
    def gaps(self) -> list[tuple[int, float]]:
        f_min = self.task.f_min
        return [(step, f - f_min) for step, _, _, f in self.points]

    @property
    def final(self) -> float:
        """Final objective; ∞ for a diverged run or a non-finite value."""
        if self.run.status != "finished":
            return math.inf
        return self.points[-1][3]

    def reached(self, threshold: float) -> int | None:
        """First iteration after which f - f* ≤ threshold (None: never)."""
        for step, gap in self.gaps:
            if gap <= threshold:
                return step
        return None

    def key(self) -> tuple:
        never = math.inf
        return (self.final,
                *[(self.reached(t) if self.reached(t) is not None else never) for t in reversed(THRESHOLDS)])


def curves(runs: list[Run]) -> list[Curve]:
    out = []
    for run in runs:
        if not _is_synthetic(run):
            continue
        name = str(run.cfg.optim.name)
        base = PRETTY.get(name, name)
        is_gen = bool(run.cfg.optim.get("gen"))
        out.append(Curve(run, str(run.cfg.task.name), f"GeN-{base}" if is_gen else base, base, is_gen,
                         float(run.cfg.optim.lr)))
    return out


def default_lr(optim_name: str) -> float | None:
    """The lr a user gets without tuning: `lr` of conf/optim/<name>.yaml (GeN's η0)."""
    path = CONF_OPTIM / f"{optim_name}.yaml"
    if not path.exists():
        return None
    lr = OmegaConf.load(path).get("lr")
    return float(lr) if lr is not None else None


@dataclass
class Choice:
    curve: Curve
    how: str  # "best of N lrs" / "default η0" / "only run" / "best η0 of N (no default-η0 run)"
    candidates: list[Curve]


def choose(all_curves: list[Curve], function: str) -> dict[str, Choice]:
    """label -> the run shown for it (see the module docstring)."""
    by_label: dict[str, list[Curve]] = {}
    for c in all_curves:
        if c.function == function:
            by_label.setdefault(c.label, []).append(c)
    chosen = {}
    for label, group in by_label.items():
        best = min(group, key=Curve.key)
        if not group[0].is_gen:
            chosen[label] = Choice(best, f"best of {len(group)} lr" if len(group) > 1 else "only run", group)
            continue
        default = default_lr(str(group[0].run.cfg.optim.name))
        at_default = [c for c in group if default is not None and math.isclose(c.lr, default, rel_tol=1e-9)]
        if at_default:
            chosen[label] = Choice(min(at_default, key=Curve.key), "default η0", group)
        elif len(group) == 1:
            chosen[label] = Choice(best, "only run", group)
        else:
            chosen[label] = Choice(best, f"best η0 of {len(group)} (no default-η0 run)", group)
    return dict(sorted(chosen.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER), kv[0])))


# -- markdown ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x is None:
        return "—"
    if math.isinf(x):
        return "diverged" if x > 0 else "-∞"
    if math.isnan(x):
        return "nan"
    return f"{x:.3g}" if x != 0 else "0"


def _iters(c: Curve, threshold: float) -> str:
    it = c.reached(threshold)
    return "never" if it is None else str(it)


def table(chosen: dict[str, Choice]) -> list[str]:
    lines = ["| optimizer | lr (chosen) | final objective | iters to f−f* ≤ 1e-3 | iters to f−f* ≤ 1e-6 |",
             "|---|---|---|---|---|"]
    for label, ch in chosen.items():
        c = ch.curve
        lr = f"{c.lr:g} ({ch.how})"
        lines.append(f"| {label} | {lr} | {_fmt(c.final)} | {_iters(c, THRESHOLDS[0])} | {_iters(c, THRESHOLDS[1])} |")
    return lines


def robustness(chosen: dict[str, Choice]) -> list[str]:
    """GeN run from several η0: how many reached each threshold, and the worst final objective."""
    rows = [(label, ch) for label, ch in chosen.items() if ch.curve.is_gen and len(ch.candidates) > 1]
    if not rows:
        return []
    lines = ["", "GeN from every initial lr η0 it ran with (robustness to η0):", "",
             "| optimizer | η0 runs | diverged | reached 1e-3 | reached 1e-6 | median final | worst final |",
             "|---|---|---|---|---|---|---|"]
    for label, ch in rows:
        finals = sorted(c.final for c in ch.candidates)
        n = len(finals)
        median = finals[n // 2] if n % 2 else 0.5 * (finals[n // 2 - 1] + finals[n // 2])
        diverged = sum(1 for c in ch.candidates if c.run.status != "finished" or math.isinf(c.final))
        r3 = sum(1 for c in ch.candidates if c.reached(1e-3) is not None and math.isfinite(c.final))
        r6 = sum(1 for c in ch.candidates if c.reached(1e-6) is not None and math.isfinite(c.final))
        lines.append(f"| {label} | {n} | {diverged} | {r3} | {r6} | {_fmt(median)} | {_fmt(finals[-1])} |")
    return lines


# -- figures ---------------------------------------------------------------------------------
def _style(label: str) -> dict[str, Any]:
    base = label[4:] if label.startswith("GeN-") else label
    return {"color": COLORS.get(base, "black"), "linestyle": "-" if label.startswith("GeN-") else "--",
            "linewidth": 2.0 if label == "GeN-SGD" else 1.3}


def _loss_panel(ax, chosen: dict[str, Choice], labels: list[str], upto: int | None, title: str) -> None:
    for label in labels:
        c = chosen[label].curve
        pts = [(s, g) for s, g in c.gaps if upto is None or s <= upto]
        xs = [s for s, _ in pts]
        ys = [max(g, LOG_FLOOR) if math.isfinite(g) else math.nan for _, g in pts]
        ax.plot(xs, ys, label=f"{label} (lr {c.lr:g})", **_style(label))
    ax.set_yscale("log")
    ax.set_xlabel("iterations")
    ax.set_ylabel("f(w) − f*")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def _contour_panel(ax, fn, chosen: dict[str, Choice], labels: list[str], upto: int, title: str) -> None:
    import numpy as np

    (x0, x1), (y0, y1) = fn.plot_range
    xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    zs = fn.function(xs, ys) - fn.f_min
    levels = np.logspace(-1, math.log10(max(float(zs.max()), 1.0)), 25)
    ax.contour(xs, ys, np.maximum(zs, 1e-12), levels=levels, norm=_lognorm(), cmap="Greys", linewidths=0.5)
    ax.plot(*fn.minimum, marker="*", color="gold", markersize=12, markeredgecolor="black", zorder=5)
    for label in labels:
        c = chosen[label].curve
        pts = [(x, y) for s, x, y, _ in c.points if s <= upto and math.isfinite(x) and math.isfinite(y)]
        if pts:
            style = _style(label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", markersize=2.5, label=label, **style)
    ax.plot(*chosen[labels[0]].curve.task.start, marker="o", color="black", markersize=5, zorder=5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6)


def _lognorm():
    from matplotlib.colors import LogNorm

    return LogNorm()


def figure(function: str, chosen: dict[str, Choice], path: Path) -> Path:
    plt = pyplot()

    fn = _function(function)
    it_all, it_gen = TRAJECTORY_ITERS.get(function, (40, 40))
    all_labels = [lb for lb in chosen if not chosen[lb].curve.is_gen] + (["GeN-SGD"] if "GeN-SGD" in chosen else [])
    all_labels = sorted(all_labels, key=lambda lb: ORDER.index(lb) if lb in ORDER else len(ORDER))
    pairs = [lb for lb in chosen if chosen[lb].curve.is_gen]
    pairs += [lb[4:] for lb in pairs if lb[4:] in chosen]
    pairs = sorted(pairs, key=lambda lb: ORDER.index(lb) if lb in ORDER else len(ORDER))
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    name = function.capitalize()
    if all_labels:
        _loss_panel(axes[0], chosen, all_labels, None, f"{name}: GeN-SGD and baselines (best lr each)")
        _contour_panel(axes[1], fn, chosen, all_labels, it_all, f"trajectories, first {it_all} iterations")
    if pairs:
        _loss_panel(axes[2], chosen, pairs, 200, "GeN-X (solid) vs X (dashed), first 200 iterations")
        _contour_panel(axes[3], fn, chosen, pairs, it_gen, f"trajectories, first {it_gen} iterations")
    fig.suptitle(f"SYNTHETIC: {name} function (cf. the paper's Figure {6 if function == 'rosenbrock' else 7})")
    return save_figure(fig, path)


# -- entry point -------------------------------------------------------------------------------
def render(runs: list[Run], out_dir: Path) -> list[Path]:
    all_curves = curves(runs)
    functions = sorted({c.function for c in all_curves}, key=lambda f: (f != "rosenbrock", f))
    written: list[Path] = []
    md = ["# SYNTHETIC: Rosenbrock and Beale (the paper's Section 5, Figures 6-7)", "",
          "Deterministic 2-D functions; synthetic results, not a benchmark of real training. "
          "Baselines: the lr of their grid with the smallest final objective; GeN: from its default "
          "initial lr (see genrun/report/synthetic.py). Iterations count optimizer steps; "
          "'never' = not within the run.", ""]
    for function in functions:
        chosen = choose(all_curves, function)
        fn = _function(function)
        start = sorted({tuple(c.task.start) for c in all_curves if c.function == function})
        md += [f"## {function.capitalize()} (synthetic)", "",
               f"Start {', '.join(str(s) for s in start)}; minimum f* = {fn.f_min:g} at {fn.minimum}; "
               f"{max(len(c.points) - 1 for c in all_curves if c.function == function)} iterations.", ""]
        md += table(chosen)
        md += robustness(chosen)
        png = figure(function, chosen, out_dir / f"synthetic_{function}.png")
        md += ["", f"![{function}]({png.name})", ""]
        written.append(png)
    path = out_dir / "synthetic.md"
    path.write_text("\n".join(md) + "\n")
    return [path, *written]
