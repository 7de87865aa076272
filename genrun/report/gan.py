"""The GAN comparison of a `+experiment=gan_offline` or `gan` sweep: a table, Figure 11's curves and a
Figure 12-style panel of samples.

A run belongs here when its config has `gan.row` (conf/experiment/gan_row/). One table row per
row: at the end of training, the test split's Fréchet distance (`fid` on celeba: FID; `fd` on
mnist_gan: in a digit classifier's feature space, not FID), `D(x)`, `D(G(z))`, `loss/D`, `loss/G`, and the last
logged lr of each player, averaged over seeds ± half their range. A diverged run is counted as
such, and a finished one whose discriminator rejects every sample is flagged beside the mean.

Figure 11 (`gan_curves.png`): per row, from its first seed's metrics.jsonl, the lr of D and G against
the step, and their training losses. Figure 12 (`gan_samples.png`): real test images, then each
row's last `samples/step<N>.png` grid (first seed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from genrun.report.runs import Run, group_runs, mean_spread, pyplot, save_figure, train_series, write_report

METRICS = ["D(x)", "D(G(z))", "loss/D", "loss/G"]  # after the Fréchet distance (`distance`)
#: What each task's Fréchet distance is, for the table's caption.
DISTANCES = {
    "fid": "FID between the test images and as many generated ones (Inception-v3's features)",
    "fd": "the Fréchet distance between the test digits and as many generated ones in a small digit "
          "classifier's feature space (not FID, and not comparable with published FIDs)",
}
LRS = ["lr/D", "lr/G"]
LABEL = {"gen": "GeN-Adam", "adam": "Adam 2e-4 (tutorial)", "adam_x10": "Adam 2e-3", "adam_div10": "Adam 2e-5"}
ORDER = ["gen", "adam", "adam_x10", "adam_div10"]
GRID = 64  # real images in Figure 12's first panel, as many as a samples grid


def applies(runs: list[Run]) -> bool:
    return any(run.select("gan.row") for run in runs)


def collect(runs: list[Run]) -> dict[str, list[Run]]:
    return group_runs(runs, lambda run: run.select("gan.row"), ORDER)


def distance(runs: list[Run]) -> str:
    """`fid` when the runs report FID (celeba), else `fd` (mnist_gan's digit features)."""
    return "fid" if any("fid" in run.final() for run in runs) else "fd"


def last_lrs(run: Run) -> dict[str, float]:
    """The lr of each player in the run's last train record that has both ({} if none)."""
    series = train_series(run, tuple(LRS))
    return dict(zip(LRS, series[-1][1])) if series else {}


def cells(members: list[Run], metrics: list[str]) -> tuple[list[str], str]:
    """The table cells of one row (`metrics`, then LRS), and a note on seeds that diverged or collapsed."""
    finished = [r for r in members if r.status == "finished" and r.final()]
    notes = []
    if diverged := sum(r.status == "diverged" for r in members):
        notes.append(f"{diverged} diverged")
    if warned := sum(bool(r.summary.get("warning")) for r in finished):
        notes.append(f"{warned} rejected every sample")
    note = f" ({', '.join(notes)})" if notes else ""
    values = [mean_spread([r.final()[m] for r in finished if r.final().get(m) is not None], 3) for m in metrics]
    lrs = [last_lrs(r) for r in finished]
    values += [mean_spread([lr[k] for lr in lrs if lr.get(k) is not None], 7) for k in LRS]
    return values, note


def render_markdown(rows: dict[str, list[Run]]) -> str:
    first = next(iter(rows.values()))[0]
    task = first.select("task.name", "?")
    name = distance([run for members in rows.values() for run in members])
    metrics = [name, *METRICS]
    columns = metrics + [f"final {k}" for k in LRS]
    header = "| row | seeds | " + " | ".join(columns) + " |"
    lines = [f"# GAN: DCGAN on {task}, GeN-Adam against constant-lr Adam", "",
             f"Test split, end of training; mean over seeds ± half the range. `{name}`: {DISTANCES[name]}, "
             "the generated ones from the task's fixed noise; lower is closer. "
             "`D(x)`, `D(G(z))`: D's mean probability on real and generated images; "
             "lr: each player's last logged learning rate.", "", header, "|" + "---|" * (len(columns) + 2)]
    for row, members in rows.items():
        values, note = cells(members, metrics)
        lines.append(f"| {LABEL.get(row, row)} | {len(members)}{note} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def render_curves(rows: dict[str, list[Run]], path: Path) -> Path:
    """Figure 11: one line of two panels per row, lr (log) of D and G, and their losses, against the step."""
    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.2 * len(rows)), squeeze=False)
    for (row, members), (ax_lr, ax_loss) in zip(rows.items(), axes):
        series = train_series(members[0], ("lr/D", "lr/G", "loss/D", "loss/G"))
        steps = [step for step, _ in series]
        for i, player in enumerate("DG"):
            ax_lr.plot(steps, [v[i] for _, v in series], "-" if player == "D" else "--", label=player)
            ax_loss.plot(steps, [v[2 + i] for _, v in series], "-" if player == "D" else "--", label=player)
        ax_lr.set(yscale="log", xlabel="step", ylabel="learning rate", title=f"{LABEL.get(row, row)}: lr")
        ax_loss.set(xlabel="step", ylabel="training loss", title=f"{LABEL.get(row, row)}: loss")
        ax_lr.legend(fontsize=8)
        ax_loss.legend(fontsize=8)
    return save_figure(fig, path)


def last_samples(run: Run) -> Path | None:
    """The run's samples/step<N>.png of the largest N (None: it wrote none)."""
    grids = [(int(m.group(1)), p) for p in (run.path / "samples").glob("step*.png")
             if (m := re.fullmatch(r"step(\d+)\.png", p.name))]
    return max(grids)[1] if grids else None


def real_grid(run: Run) -> Any | None:
    """The first GRID test images of the run's task as an H x W x C array, as a samples grid lays
    them out (None: its data cannot be read here, e.g. CelebA on another machine)."""
    from hydra.utils import instantiate
    from torchvision.utils import make_grid

    try:
        task = instantiate(run.cfg.task, fd=False, fid=False)  # only the images: no feature network
        test = task.splits()[1]
        images = [test[i][0] for i in range(min(GRID, len(test)))]
    except Exception:  # noqa: BLE001 - the panel is drawn without the real images, never fails the report
        return None
    grid = make_grid(images, nrow=8, normalize=True, value_range=(-1, 1))
    return grid.permute(1, 2, 0).numpy()


def render_samples(rows: dict[str, list[Run]], path: Path) -> Path:
    """Figure 12: real test images | each row's last sample grid (first seed)."""
    from PIL import Image

    plt = pyplot()
    panels: list[tuple[str, Any]] = []
    first = next(iter(rows.values()))[0]
    if (real := real_grid(first)) is not None:
        panels.append(("real test images", real))
    for row, members in rows.items():
        png = last_samples(members[0])
        if png is not None:
            with Image.open(png) as image:
                panels.append((f"{LABEL.get(row, row)} ({png.stem})", image.convert("RGB").copy()))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.4 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        ax.imshow(image, cmap="gray")
        ax.set_title(title, fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    return save_figure(fig, path)


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    rows = collect(runs)
    written = write_report(out_dir, "gan", render_markdown(rows), lambda path: render_curves(rows, path))
    return written + [render_samples(rows, Path(out_dir) / "gan_samples.png")]
