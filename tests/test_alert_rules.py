"""Alert rules: promtool accepts them, and the stale-source alert fires when it is due."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from headwater import stack
from headwater.errors import HeadwaterError
from headwater.settings import PROJECT_ROOT, Settings

PROMETHEUS = PROJECT_ROOT / "deployments" / "prometheus"
# The first run builds promtool (`go install`: many minutes on 2 cores) unless `.ci/run` or
# `headwater build --promtool` already did; later runs take a second.
pytestmark = pytest.mark.timeout(3600)


@pytest.fixture(scope="module")
def promtool(settings: Settings) -> Path:
    """The pinned promtool, built with `go install` the first time (minutes), then cached."""
    try:
        return stack.promtool_binary(settings)
    except HeadwaterError as error:
        pytest.fail(f"promtool could not be built: {error.user_message}\n{error.log_message}",
                    pytrace=False)


def _promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], cwd=PROMETHEUS, capture_output=True,
                          text=True, timeout=120)


def test_promtool_accepts_every_alert_rule(promtool: Path) -> None:
    checked = _promtool(promtool, "check", "rules", "alerts.yml")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 7 rules found" in checked.stdout + checked.stderr


def test_promtool_accepts_the_prometheus_config_and_the_rules_it_loads(promtool: Path) -> None:
    checked = _promtool(promtool, "check", "config", "prometheus.yml")

    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_source_alerts_as_stale_only_after_three_intervals_for_ten_minutes(
        promtool: Path) -> None:
    # alerts_test.yml: a stalled source fires at minute 41, not at 30 (exactly 3 intervals) or
    # 40 (pending); one syncing on time and one without a schedule never do.
    tested = _promtool(promtool, "test", "rules", "alerts_test.yml")

    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout + tested.stderr
