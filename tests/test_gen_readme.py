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
