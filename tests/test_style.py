"""The code base stays `ruff` clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from headwater.settings import PROJECT_ROOT


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([ruff, "check", "."], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
