"""Run dirs: claimed before Hydra writes into them, locked while a run uses them, undone exactly.

genrun removes only what this process created and puts back what it changed: a dir that existed
before the run started is never removed, whatever it holds. `claim` makes (or takes) the dir before
Hydra writes `.hydra/` into it, recording which folders it made and what the dir held, and locks it
(`flock` on the dir itself, which the system drops when the process ends, even after kill -9): a
second genrun into a dir in use is refused. A name with `${now:...}` is made with an atomic mkdir,
so runs started in the same second get `<time>`, `<time>-1`, ...

After a failed start (bad input found while building, Ctrl-C before the run wrote a record),
`Claim.discard` removes a dir this process made, whole, with the folders made for it; in a dir that
existed it removes only the new entries, puts `.hydra/`'s files back and cuts Hydra's log to its
old length.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from genrun import atomic
from genrun.errors import UserError

#: What a run writes besides Hydra's `.hydra/` and log: a dir with any of these holds a run.
RUN_FILES = ("metrics.jsonl", "gen.jsonl", "summary.json", "ckpt.pt")

#: Set by a sweep's claim to its dir: the job dirs under it are all this sweep's own.
SWEEP_ENV = "GENRUN_SWEEP_DIR"

#: Write errors worded as one line (the disk, the permissions), rather than a traceback.
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                  errno.ENAMETOOLONG, errno.ENOTDIR}

Stats = dict[str, tuple[int, int]]


@dataclass
class Claim:
    path: Path
    made: list[Path]  # folders this process created, outermost first (`path` last when it is new)
    fd: int | None = None  # `path`, open and locked
    before: Stats = field(default_factory=dict)  # its entries when claimed: name -> (size, mtime)
    hydra_files: dict[str, bytes] = field(default_factory=dict)  # .hydra/<name> -> bytes when claimed

    @property
    def new(self) -> bool:
        return bool(self.made) and self.made[-1] == self.path

    def used(self) -> bool:
        """Whether the run wrote anything of its own (records, a checkpoint, a sweep's job that ran)
        rather than only Hydra's bookkeeping: a used dir is kept whatever happens next."""
        for name, stat in _entries(self.path).items():
            if name in (".hydra", "multirun.yaml") or name.endswith(".log") or self.before.get(name) == stat:
                continue
            child = self.path / name
            if not child.is_dir() or (any((child / f).exists() for f in RUN_FILES) and not failed_start(child)):
                return True
        return False

    def discard(self) -> None:
        """Undo this process's traces in the dir (after a failed start; call while holding the lock)."""
        if self.new:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.is_dir():
            self._restore()
        for folder in reversed(self.made[:-1] if self.new else self.made):
            try:
                folder.rmdir()  # only while empty: another run may have started in it meanwhile
            except OSError:
                break
        self.made = []

    def discard_unless_used(self) -> None:
        if not self.used():
            self.discard()

    def _restore(self) -> None:
        for name in _entries(self.path).keys() - self.before.keys():
            _remove(self.path / name)
        hydra = self.path / ".hydra"
        if ".hydra" in self.before and hydra.is_dir():
            for extra in {p.name for p in hydra.iterdir()} - self.hydra_files.keys():
                _remove(hydra / extra)
            for name, data in self.hydra_files.items():
                if not (hydra / name).is_file() or (hydra / name).read_bytes() != data:
                    (hydra / name).write_bytes(data)
        for name, (size, _) in self.before.items():
            if name.endswith(".log") and (self.path / name).is_file():
                os.truncate(self.path / name, size)  # Hydra appends to its log

    def release(self) -> None:
        """Unlock (the dir stays as it is)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self in _claims:
            _claims.remove(self)


_claims: list[Claim] = []


def claim(path: str | os.PathLike, *, key: str, fresh: bool = False) -> Claim:
    """Make or take the dir `path` for this process, locked. `fresh`: a name already taken gets a
    `-1`, `-2`, ... suffix instead (an automatic name). `key` names the setting in messages."""
    made: list[Path] = []
    target = Path(os.path.abspath(Path(path).expanduser()))
    try:
        target = _make(Path(os.path.realpath(target)), fresh, made)
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
        fd = _lock(target)
    except _InUse:  # the folders made here are the other run's now: they stay
        raise UserError(f"{key}={target} is in use by another running genrun (it holds the dir's lock); wait for "
                        f"it to end, or choose another {key}") from None
    except OSError as err:
        _undo(made)
        raise UserError(f"{key}={target}: cannot make or write this dir ({err.strerror or err}); choose another, "
                        f"e.g. {key}=outputs/run1") from None
    hydra = target / ".hydra"
    saved = {p.name: p.read_bytes() for p in hydra.iterdir() if p.is_file()} if hydra.is_dir() else {}
    taken = Claim(target, made, fd, before=_entries(target), hydra_files=saved)
    _claims.append(taken)
    return taken


def for_job(path: Path, sweep_dir: Path | None) -> Claim | None:
    """The claim of the job running in `path`: the one `claim` made (a single run), or, for a job of
    a sweep, its dir, which Hydra has just made: all this job's own when the sweep's claim vouches
    for it (`SWEEP_ENV`), else taken as it is. None when nothing claimed it (a config without
    genrun's callback), so nothing is ever removed."""
    path = Path(os.path.realpath(path))
    for taken in _claims:
        if taken.path == path:
            return taken
    if sweep_dir is None:
        return None
    ours = os.environ.get(SWEEP_ENV) == os.path.realpath(sweep_dir)
    try:
        fd = _lock(path)
    except _InUse:
        raise UserError(f"{path} is in use by another running genrun; wait for it to end") from None
    taken = Claim(path, [path] if ours else [], fd, before={} if ours else _entries(path))
    _claims.append(taken)
    return taken


def close_all(failed: bool) -> None:
    """At exit: after a failure, undo every claim the run did not use; then unlock all."""
    for taken in reversed(list(_claims)):
        if failed and taken.fd is not None:
            taken.discard_unless_used()
        taken.release()


def record_failed_start(run_dir: Path, message: str) -> None:
    """A sweep's job that failed before training says so in its summary.json, so the sweep goes on
    and its report lists the job as failed; a sweep none of whose jobs started leaves nothing."""
    summary = {"status": "failed", "message": message, "step": 0, "started": False, "final": {}, "lr": []}
    atomic.write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def failed_start(run_dir: Path) -> bool:
    """Whether `run_dir` holds only the record of a job that failed before training."""
    if any((run_dir / name).exists() for name in RUN_FILES if name != "summary.json"):
        return False
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("started") is False
    except (OSError, ValueError, AttributeError):
        return False


def holds_run(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() or any((path / name).exists() for name in RUN_FILES)


def holds_sweep(path: Path) -> bool:
    """A sweep's dir, or one with job dirs (`0`, `1`, ...) or runs in it."""
    return (path / "multirun.yaml").exists() or any(
        child.is_dir() and (child.name.isdigit() or holds_run(child)) for child in path.iterdir())


def in_use(path: Path) -> bool:
    """Whether a running genrun holds `path`'s lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # drops the lock this probe may have taken


def storage_problem(err: BaseException, where: Path) -> str | None:
    """One line for a write that failed for want of space or permission (naming the disk), or None."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRORS:
        return None
    path = Path(err.filename) if err.filename else where
    writing = f"writing {path}" if err.filename else f"writing into {path}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        disk = _mount_point(path)
        try:
            free = f", {shutil.disk_usage(disk).free / 2**20:.0f} MB free"
        except OSError:
            free = ""
        return f"the disk at {disk} is full ({err.strerror} {writing}{free}): free space there"
    return f"{err.strerror} {writing}: make it writable, or choose another hydra.run.dir"


class _InUse(Exception):
    pass


def _make(path: Path, fresh: bool, made: list[Path]) -> Path:
    """Create `path` (and its missing parents, recorded in `made`); an existing one is taken as it
    is, unless `fresh`, when the next free `-N` name is made."""
    for folder in reversed([p for p in path.parents if not p.exists()]):
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:  # made meanwhile by a run started at the same moment
            pass
    for n in range(1000):
        candidate = path if n == 0 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            if fresh:
                continue
            if not candidate.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "a file of that name exists") from None
            return candidate
        made.append(candidate)
        return candidate
    raise FileExistsError(errno.EEXIST, "a thousand runs already have this name")


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _InUse() from None
    except OSError:  # a file system without flock (some network mounts): the run goes on unlocked
        pass
    return fd


def _undo(made: list[Path]) -> None:
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            break


def _entries(path: Path) -> Stats:
    try:
        stats = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(path)}
        return {name: (st.st_size, st.st_mtime_ns) for name, st in stats.items()}
    except OSError:
        return {}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() or not os.path.ismount(path):
        path = path.parent
    return path
