"""The README starts with the two commands a newcomer runs, and CI runs exactly the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block and (ROOT / "README.md").read_text().index("```bash") < 40, "the README must open with its commands"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


def test_ci_runs_exactly_the_readmes_test_command():
    chat, tests = _readme_commands()
    assert "ernie45 chat" in chat and "pip install" in chat
    assert "pytest" in tests and "scripts/test-deps.sh" in tests  # the set-up is part of the command itself
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci == [tests]


def test_the_test_setup_names_every_system_program_the_suite_drives():
    script = (ROOT / "scripts/test-deps.sh").read_text()
    for program in ("espeak-ng", "wordnet-base", "chromium", "chromium-driver"):
        assert program in script
