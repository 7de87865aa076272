"""What genrun tells the person running it: the lines go to the terminal and into the run's
genrun.log, and training progress is a bar on a terminal or a plain line now and then off one.

Off a terminal (`genrun ... | tee`, a SLURM log, a file) a tqdm bar writes a line per update, so a
20-epoch run fills its log with hundreds of them; a line every `Progress.EVERY_S` seconds or every
tenth of the run says as much.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

#: The logger whose only handler is the run's log file (conf/config.yaml's hydra.job_logging):
#: the terminal already got the line from print.
FILE_LOG = logging.getLogger("genrun.console")


def say(text: str, stream: TextIO | None = None) -> None:
    """Print `text` (stdout unless `stream`) and keep it in the run's genrun.log."""
    print(text, file=stream or sys.stdout, flush=True)
    for line in text.splitlines():
        FILE_LOG.info(line)


class Progress:
    """`trainer.progress`: auto (a bar on a terminal, lines off one), on (a bar), off (nothing)."""

    EVERY_S = 60.0  # at most this long between two lines off a terminal
    PARTS = 10      # ... and a line at each tenth of the run

    def __init__(self, mode: str | bool, total: int, initial: int, enabled: bool = True) -> None:
        mode = {True: "on", False: "off"}.get(mode, mode)  # YAML reads on/off as booleans
        self.total, self.start_step, self.started = total, initial, time.perf_counter()
        self.bar = None
        self.lines = enabled and mode == "auto" and not sys.stderr.isatty()
        if enabled and (mode == "on" or (mode == "auto" and not self.lines)):
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step")
        self.last_line, self.last_part = self.started, initial * self.PARTS // max(total, 1)

    def update(self, step: int, epoch: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
        if not self.lines:
            return
        now, part = time.perf_counter(), step * self.PARTS // max(self.total, 1)
        if now - self.last_line >= self.EVERY_S or part > self.last_part or step == self.total:
            self.last_line, self.last_part = now, part
            say(self.line(step, epoch, loss, lr, now), sys.stderr)

    def line(self, step: int, epoch: int, loss: float, lr: float, now: float) -> str:
        rate = (step - self.start_step) / max(now - self.started, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("nan")
        eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}" if left == left else "?"
        return (f"genrun: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%), epoch {epoch}, "
                f"loss {loss:.4f}, lr {lr:.3g}, {rate:.2f} step/s, {eta} left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
