"""The repository's own lint and format rules (pyproject.toml [tool.ruff]) hold: CI runs them with the suite."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert found, "ruff is missing: it is part of the test extras (pip install '.[test]')"
    return [found]


def test_ruff_lint_passes():
    done = subprocess.run([*_ruff(), "check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_is_applied():
    done = subprocess.run(
        [*_ruff(), "format", "--check", "--no-cache", str(REPO)], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, "run `ruff format .`:\n" + done.stdout + done.stderr
