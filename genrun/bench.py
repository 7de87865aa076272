"""`make bench`: GeN's step-time overhead and peak memory against its base optimizer.

For each model it times a plain training step (forward, backward, optimizer step) and the
same step driven by GeN at Φ = 1, 2, 4, 8, and reports relative speed = base step time /
GeN step time (1.0 is free). It also times the floors of the probe schemes: a plain step
plus two no-grad forwards every Φ steps (the paper's two probes), or one (GeN fast's one
probe). Inputs are random tensors (synthetic), so the numbers measure compute, not data loading.

CPU: a small CNN on digits-sized input (8x8, batch 64). CUDA: ResNet-18 with SGD and
ViT-S/16 with AdamW, batch 256, 224x224, fp32 with TF32 matmuls.

    python -m genrun.bench [--device auto|cpu|cuda] [--steps N] [--out results.json] [--profile DIR]

``--profile DIR`` also runs the base step, GeN fast at Φ = 1 and its floor under
torch.profiler and writes, per model, the ops that take the most time and Chrome traces
of the GeN and floor steps: on a GPU, wall time minus kernel time per step is the time
the GPU waits on the host (GeN's one sync per probe step), the rest is extra kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType

from genrun.gen import GeN
from genrun.models import SmallCNN

PHIS = (1, 2, 4, 8)
PROFILED_STEPS = 4  # few: the trace holds every op and kernel of every step
SCHEMES = {
    # name: GeN keyword arguments
    "gen (probes -1,+1; slope from grad)": {"points": (-1.0, 0.0, 1.0)},
    "gen fast (probe +1; slope from grad)": {"points": (0.0, 1.0), "min_r2": None},
}
FAST = "gen fast (probe +1; slope from grad)"
FLOORS = {  # (no-grad forwards, host sync after them): name
    (2, False): "two no-grad forwards (floor)",
    (1, False): "one no-grad forward (floor of fast)",
    (1, True): "one no-grad forward + host sync",
}
FAST_FLOOR = (1, True)  # what GeN fast cannot do without: one forward, one host read


@dataclass
class Setting:
    name: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[Any], torch.optim.Optimizer]
    batch: int
    shape: tuple[int, ...]
    classes: int


def settings(device: torch.device) -> list[Setting]:
    if device.type == "cpu":
        return [Setting("small CNN, SGD, 8x8, B=64", lambda: SmallCNN(1, 10),
                        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4), 64, (1, 8, 8), 10)]
    import timm
    import torchvision

    return [
        Setting("ResNet-18, SGD, 224, B=256", lambda: torchvision.models.resnet18(num_classes=1000),
                lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4), 256, (3, 224, 224), 1000),
        Setting("ViT-S/16, AdamW, 224, B=256", lambda: timm.create_model("vit_small_patch16_224", num_classes=1000),
                lambda p: torch.optim.AdamW(p, lr=1e-4), 256, (3, 224, 224), 1000),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(setting: Setting, device: torch.device, steps: int, warmup: int,
               gen_kwargs: dict | None = None, floor: tuple[int, int, bool] | None = None,
               profile: bool = False, trace: Path | None = None) -> dict[str, Any]:
    """Mean seconds per optimizer step and peak memory for one way of stepping.

    ``floor=(Φ, n, sync)``: a plain step plus n no-grad forwards of the same batch every Φ steps
    (then, with ``sync``, one host read of their loss, as a probe step's decision needs).

    With ``profile`` the timed steps run under torch.profiler: ``busy_s`` is the
    device's kernel time per step, ``top_ops`` a table, ``trace`` where a Chrome trace goes.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the previous row's model and optimizer are gone by now
    torch.manual_seed(0)
    model = setting.model().to(device).train()
    opt = setting.optimizer(model.parameters())
    gen = GeN(opt, model=model, **gen_kwargs) if gen_kwargs is not None else None
    x = torch.randn(setting.batch, *setting.shape, device=device)
    y = torch.randint(0, setting.classes, (setting.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        return loss_fn(model(x), y)

    def one_step(t: int) -> None:
        loss = closure()
        loss.backward()
        if gen is not None:
            gen.step(closure, loss=loss.detach())
        else:
            opt.step()
            if floor and t % floor[0] == 0:
                with torch.no_grad():
                    probed = [closure() for _ in range(floor[1])]
                if floor[2]:
                    probed[-1].item()
        opt.zero_grad(set_to_none=True)

    for t in range(warmup):
        one_step(t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    times = []
    with _profiler(device) if profile else contextlib.nullcontext() as prof:
        for t in range(steps):
            start = time.perf_counter()
            one_step(t)
            _sync(device)
            times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    result: dict[str, Any] = {"step_s": statistics.fmean(times), "peak_mb": memory}
    if prof is not None:
        ops = prof.key_averages()
        # kernels and copies are the CUDA-typed events; CPU ops' device time would count them twice
        busy = sum(e.self_device_time_total for e in ops if e.device_type == DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)) / 1e6 / steps
        result.update(busy_s=busy if device.type == "cuda" else float("nan"),
                      top_ops=ops.table(sort_by="self_device_time_total" if device.type == "cuda"
                                        else "self_cpu_time_total", row_limit=25))
        if trace is not None:
            prof.export_chrome_trace(str(trace))
    return result


def _profiler(device: torch.device) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def profile_rows(setting: Setting, device: torch.device, warmup: int, folder: Path) -> list[dict[str, Any]]:
    """The base step, GeN fast at Φ = 1 and its floor under the profiler; writes ``<model>.txt`` and traces."""
    folder.mkdir(parents=True, exist_ok=True)
    slug = setting.name.split(",")[0].lower().replace(" ", "_").replace("/", "")
    rows = [{"scheme": "base", **time_steps(setting, device, PROFILED_STEPS, warmup, profile=True)},
            {"scheme": f"{FLOORS[FAST_FLOOR]}, Φ=1", **time_steps(setting, device, PROFILED_STEPS, warmup,
                                                                  floor=(1, *FAST_FLOOR), profile=True,
                                                                  trace=folder / f"{slug}_floor.json")},
            {"scheme": "gen fast, Φ=1", **time_steps(setting, device, PROFILED_STEPS, warmup,
                                                     gen_kwargs={"every": 1, **SCHEMES[FAST]}, profile=True,
                                                     trace=folder / f"{slug}_gen_fast.json")}]
    text = [f"{setting.name}: {PROFILED_STEPS} profiled steps each (the profiler slows the host)", ""]
    for row in rows:
        wall, busy, idle = _split_ms(row)
        text += [f"## {row['scheme']}: wall {wall} ms/step, kernels {busy} ms/step, device idle {idle} ms/step",
                 row.pop("top_ops"), ""]
    (folder / f"{slug}.txt").write_text("\n".join(text))
    return rows


def run(device: torch.device, steps: int, warmup: int, only: str | None = None,
        profile: Path | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {"device": _describe(device), "steps": steps, "settings": []}
    for setting in settings(device):
        if not _chosen(setting.name, only):
            continue
        base = time_steps(setting, device, steps, warmup)
        rows = []
        for phi in PHIS:
            for (forwards, sync), name in FLOORS.items():
                rows.append({"scheme": name, "phi": phi, **time_steps(setting, device, steps, warmup,
                                                                       floor=(phi, forwards, sync))})
            for scheme, kwargs in SCHEMES.items():
                timed = time_steps(setting, device, steps, warmup, gen_kwargs={"every": phi, **kwargs})
                rows.append({"scheme": scheme, "phi": phi, **timed})
        cpu_snapshot = time_steps(setting, device, steps, warmup,
                                  gen_kwargs={"every": 1, "snapshot": "cpu", **SCHEMES[next(iter(SCHEMES))]})
        rows.append({"scheme": "gen, snapshot=cpu", "phi": 1, **cpu_snapshot})
        for row in rows:
            row["relative_speed"] = base["step_s"] / row["step_s"]
        params_mb = sum(p.numel() * p.element_size() for p in setting.model().parameters()) / 2**20
        entry = {"name": setting.name, "base": base, "params_mb": params_mb, "rows": rows}
        if profile is not None:
            try:
                entry["profile"] = profile_rows(setting, device, warmup, profile)
            except Exception as err:  # noqa: BLE001  the profiler is optional; never lose the timed rows to it
                entry["profile_error"] = f"{type(err).__name__}: {err}"
        results["settings"].append(entry)
    return results


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _chosen(name: str, only: str | None) -> bool:
    """``--only``: a case-insensitive substring of the setting's name (None: every setting)."""
    return not only or only.lower() in name.lower()


def _split_ms(row: dict[str, Any]) -> tuple[str, str, str]:
    """A profiled row's wall, kernel and device-idle ms per step, formatted ("n/a" without CUDA)."""
    wall, busy = row["step_s"] * 1e3, row["busy_s"] * 1e3
    return f"{wall:.2f}", _num(busy, ".2f"), _num(wall - busy, ".2f")


def _num(value: float, spec: str = ".0f") -> str:
    return "n/a" if value != value else f"{value:{spec}}"  # NaN: the CPU has no allocator peak or kernel time


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Device: {results['device']}; {results['steps']} timed steps per row; synthetic inputs.", ""]
    for s in results["settings"]:
        lines += [f"**{s['name']}**: base step {s['base']['step_s'] * 1e3:.1f} ms, "
                  f"peak {_num(s['base']['peak_mb'])} MB, params {s['params_mb']:.0f} MB", "",
                  "| scheme | Φ | relative speed | peak memory (MB) |", "|---|---|---|---|"]
        for row in s["rows"]:
            lines.append(f"| {row['scheme']} | {row['phi']} | {row['relative_speed']:.2f} | {_num(row['peak_mb'])} |")
        lines.append("")
        if "profile_error" in s:
            lines += [f"Profiling failed: {s['profile_error']}", ""]
        if "profile" in s:
            lines += [f"Profiled, per step ({PROFILED_STEPS} steps; op tables and a trace in --profile's folder):", "",
                      "| scheme | wall ms | kernel ms | device idle ms |", "|---|---|---|---|"]
            for row in s["profile"]:
                lines.append(f"| {row['scheme']} | {' | '.join(_split_ms(row))} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 200 CPU, 40 CUDA)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--only", default=None, help="run only the settings whose name contains this (e.g. resnet)")
    parser.add_argument("--profile", default=None, type=Path,
                        help="also profile the base step, GeN fast at Φ=1 and its floor; "
                             "write op tables and traces here")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    steps = args.steps or (40 if device.type == "cuda" else 200)
    names = [s.name for s in settings(device)]
    if not any(_chosen(name, args.only) for name in names):
        raise SystemExit(f"genrun.bench: error: --only {args.only!r} matches no model on {device.type}; "
                         f"there: {'; '.join(names)}")
    results = run(device, steps, args.warmup, args.only, args.profile)
    print(markdown(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
