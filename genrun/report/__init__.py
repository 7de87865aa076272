"""`genrun-report <sweep dir>`: tables and figures from a sweep's runs, written into the sweep dir.

Each report module exposes `applies(runs) -> bool` and `render(runs, out_dir) -> list[Path]`;
every module that applies to the sweep's runs renders; when none of the paper's tables applies,
`sweep` renders an overview of whatever the sweep varied. `runs.load_runs` reads each job's
resolved config, summary and metrics once, so reports never parse run dirs themselves.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from genrun import version_line
from genrun.report import sweep
from genrun.report.runs import load_runs

# Report modules, in the order they render. Each is genrun.report.<name>.
REPORTS: list[str] = ["synthetic", "table2", "table3", "table4", "table5", "table7", "gen_suite"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genrun-report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # --version on one line
    parser.add_argument("sweep_dir", type=Path, help="a genrun -m sweep dir (or a dir of run dirs)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep dir)")
    parser.add_argument("--version", action="version", version=version_line("genrun-report"))
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"genrun-report: error: {args.sweep_dir} is not a directory; pass a sweep dir", file=sys.stderr)
        return 2
    notes: list[str] = []
    runs = load_runs(args.sweep_dir, notes)
    if not runs:
        _print_notes(notes)
        print(f"genrun-report: error: no runs (dirs with summary.json) under {args.sweep_dir}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir
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


def _print_notes(notes: list[str]) -> None:
    for note in dict.fromkeys(notes):  # each once, in order
        print(f"genrun-report: note: {note}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
