"""Learning-rate schedules of the paper's Table 8, as multipliers of the initial lr c0.

Each function maps (t, T) -> factor, with t the optimizer step and T the total number of
steps. Configs in conf/sched/ select one with `_target_` and `_partial_: true`; the engine
wraps the result in `torch.optim.lr_scheduler.LambdaLR`.
"""

from __future__ import annotations

import math


def constant(t: int, total: int) -> float:
    """η_t = c0."""
    return 1.0


def linear(t: int, total: int) -> float:
    """η_t = c0 (1 - t/T)."""
    return max(0.0, 1.0 - t / total)


def cosine(t: int, total: int) -> float:
    """η_t = c0 (1 + cos(πt/T)) / 2."""
    return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def invsqrt(t: int, total: int, timescale: float = 1.0) -> float:
    """η_t = c0 / sqrt(1 + t/τ); τ = `timescale` steps (the paper's c0/√t, shifted to start at c0)."""
    return 1.0 / math.sqrt(1.0 + t / timescale)


def inv(t: int, total: int, timescale: float = 1.0) -> float:
    """η_t = c0 / (1 + t/τ); τ = `timescale` steps (the paper's c0/t, shifted to start at c0)."""
    return 1.0 / (1.0 + t / timescale)


def step(t: int, total: int, milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> float:
    """η_t = c0 γ^k after the k-th milestone; milestones are fractions of T."""
    return gamma ** sum(t >= m * total for m in milestones)


def exp(t: int, total: int, final_ratio: float = 0.01) -> float:
    """η_t = c0 exp(-p t) with p chosen so that η_T = c0 · `final_ratio`."""
    return final_ratio ** (t / total)


def warmup_cosine(t: int, total: int, warmup: float = 0.05, min_ratio: float = 0.0) -> float:
    """Linear warm-up from c_min to c0 over the first `warmup`·T steps, then cosine to c_min.

    c_min = `min_ratio`·c0 (the paper's WarmUp row, followed by LLaMA-style cosine decay).
    """
    warm = max(1, round(warmup * total))
    if t < warm:
        return min_ratio + (1.0 - min_ratio) * t / warm
    progress = min(1.0, (t - warm) / max(1, total - warm))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear(t: int, total: int, warmup: float = 0.06) -> float:
    """Linear warm-up from 0 to c0 over the first `warmup`·T steps, then linear decay to 0.

    The schedule of the published GLUE baselines the paper's Table 4 compares with (Hu et al.'s
    LoRA runs use a 6 % warm-up ratio).
    """
    warm = max(1, round(warmup * total))
    if t < warm:
        return t / warm
    return max(0.0, (total - t) / max(1, total - warm))


def warmup_constant(t: int, total: int, warmup: float = 0.05, start: float = 0.001) -> float:
    """Linear warm-up from `start`·c0 to c0 over the first `warmup`·T steps, then constant c0.

    The "manual" schedule of the paper's Table 5: torchvision's detection tutorial warms up
    from 0.001·c0 over the first epoch and then keeps the lr.
    """
    warm = max(1, round(warmup * total))
    return start + (1.0 - start) * t / warm if t < warm else 1.0
