"""SIGTERM and SIGUSR1 stop a run as Ctrl-C does: status `interrupted`, the resume command, exit 128 + signal.

SIGTERM is what SLURM, Kubernetes and `timeout` send before they kill; SIGUSR1 is how a cluster can
warn before its time limit (sbatch --signal). In a one-process run's training loop the signal lets
the current step finish: the engine then checkpoints that step and raises `Stopped` (`pending`,
`now`), so a resumed run repeats nothing. Anywhere else (start-up, several processes, whose steps
must stay in lockstep) it raises `Stopped` at once, as Ctrl-C raises KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Stopped(KeyboardInterrupt):
    """A stop signal: a KeyboardInterrupt, so everything that handles Ctrl-C handles it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state: dict[str, object] = {}


def install() -> None:
    """Handle SIGTERM and SIGUSR1 in this process (only the main thread may set handlers)."""
    _state.update(defer=False, pending=None, stopping=False)
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _handle)


def _handle(signum: int, frame: object) -> None:
    if _state["stopping"] or _state["pending"] is not None:
        return  # stopping already: a second signal (a cluster signals every process) must not cut the summary short
    if _state["defer"]:
        _state["pending"] = signum  # the engine stops at the end of this step
        return
    _state["stopping"] = True
    raise Stopped(signum)


def defer(on: bool) -> None:
    """While on, a stop signal waits for `now` at the end of the current step."""
    _state["defer"] = on


def pending() -> bool:
    return _state.get("pending") is not None


def now() -> None:
    """Raise the stop that a signal asked for (nothing if none did)."""
    signum = _state.get("pending")
    if signum is not None:
        _state.update(pending=None, stopping=True)
        raise Stopped(int(signum))  # type: ignore[arg-type]


def describe(err: KeyboardInterrupt) -> str:
    return f"stopped by {err.args[0]}" if isinstance(err, Stopped) else "interrupted"


def exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal, the shell's convention: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + (err.signum if isinstance(err, Stopped) else signal.SIGINT)
