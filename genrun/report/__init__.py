"""`genrun-report <sweep dir> [more dirs]`: tables and figures from a sweep's runs, written into the sweep dir.

Each report module exposes `applies(runs) -> bool` and `render(runs, out_dir) -> list[Path]`;
every module that applies to the sweep's runs renders; when none of the paper's tables applies,
`sweep` renders an overview of whatever the sweep varied. `runs.load_runs` reads each job's
resolved config, summary and metrics once, so reports never parse run dirs themselves.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from genrun import version_line
from genrun.report import sweep
from genrun.report.runs import Run, load_runs

#: Where a report over several dirs goes unless --out says otherwise (in the current directory).
COMBINED = "genrun-report"

# Report modules, in the order they render. Each is genrun.report.<name>.
REPORTS: list[str] = ["synthetic", "table2", "table3", "table4", "table5", "table7", "gen_suite", "gan"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genrun-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    parser.add_argument("sweep_dirs", type=Path, nargs="+", metavar="sweep_dir",
                        help="a genrun -m sweep dir, or any dir of run dirs (symbolic links are followed); "
                             "several make one table of all their runs")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to write (default: the sweep dir; with several, ./{COMBINED})")
    parser.add_argument("--version", action="version", version=version_line("genrun-report"))
    args = parser.parse_args(argv)
    for sweep_dir in args.sweep_dirs:
        if not sweep_dir.is_dir():
            print(f"genrun-report: error: {sweep_dir} is not a directory; pass a sweep dir", file=sys.stderr)
            return 2
    notes: list[str] = []
    runs = _unique(run for sweep_dir in args.sweep_dirs for run in load_runs(sweep_dir, notes))
    if not runs:
        _print_notes(notes)
        where = " or ".join(str(d) for d in args.sweep_dirs)
        print(f"genrun-report: error: no runs (dirs with summary.json) under {where}", file=sys.stderr)
        return 2
    out = args.out or (args.sweep_dirs[0] if len(args.sweep_dirs) == 1 else Path(COMBINED))
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in REPORTS:
        module = importlib.import_module(f"genrun.report.{name}")
        if module.applies(runs):
            written += module.render(runs, out)
    if not written:  # not a paper table's sweep: the overview any sweep has
        written = sweep.render(runs, out)
    for path in written:
        print(path)
    _print_notes(notes)
    commits = sorted({c for r in runs if (c := r.summary.get("versions", {}).get("genrun_commit"))})
    if len(commits) > 1:  # a table over runs of different code is worth knowing about
        print(f"genrun-report: note: these runs come from {len(commits)} genrun commits ({', '.join(commits)}); "
              "summary.json's versions says which run used which", file=sys.stderr)
    return 0


def _unique(runs: Iterable[Run]) -> list[Run]:
    """Each run once, however many of the given dirs (or links) reach it."""
    return list({os.path.realpath(run.path): run for run in runs}.values())


def _print_notes(notes: list[str]) -> None:
    for note in dict.fromkeys(notes):  # each once, in order
        print(f"genrun-report: note: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
