"""`headwater up/status/down` on a private stack: idempotent start, clean stop, fast failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import isolated_settings

from headwater import stack
from headwater.errors import IndexUnavailable, IndexWriteError
from headwater.records import Chunk
from headwater.settings import Settings, env_value
from tasks.index import connect_index, ensure_collection, upsert_chunks

HEADWATER = str(Path(sys.executable).parent / "headwater")


def _env(settings: Settings) -> dict[str, str]:
    values = {f"HEADWATER_{k.upper()}": env_value(v) for k, v in settings.model_dump().items()
              if v is not None}
    return {**os.environ, **values}


def _headwater(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HEADWATER, *args], env=_env(settings), capture_output=True, text=True,
                          timeout=400)


def test_up_twice_starts_nothing_new_and_down_leaves_no_process(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path / "data", work_pool="lifecycle-pool")

    first = _headwater(settings, "up")
    if first.returncode != 0:
        stack.down(settings)
    assert first.returncode == 0, first.stderr + first.stdout
    assert first.stdout.count("(started now)") == 3
    tree = stack.process_tree(settings)
    assert len(tree) >= 3

    shown = _headwater(settings, "status")
    assert shown.returncode == 0, shown.stdout
    for name in ("weaviate", "prefect-server", "prefect-worker"):
        assert name in shown.stdout
    assert "1.38.11" in shown.stdout
    assert str(tmp_path / "data" / "logs" / "weaviate.log") in shown.stdout

    second = _headwater(settings, "up")
    assert second.returncode == 0, second.stderr
    assert "(started now)" not in second.stdout
    assert "nothing started" in second.stdout
    assert stack.process_tree(settings) == tree

    stopped = _headwater(settings, "down")
    assert stopped.returncode == 0, stopped.stderr
    alive = [pid for pid in tree if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]]
    assert alive == []
    assert _headwater(settings, "status").returncode == 1


def test_a_killed_weaviate_fails_writes_fast_with_a_clear_message(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path / "data", weaviate_timeout_s=10)
    stack.up(settings, only={"weaviate"})
    try:
        with connect_index(settings) as client:
            ensure_collection(client, "Doomed")
            chunk = Chunk(source="s", doc_id="d", ordinal=0, text="t")
            upsert_chunks(client, "Doomed", [chunk], [[1.0] * 384])
            os.kill(stack.pid_of(settings, "weaviate"), signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises((IndexWriteError, IndexUnavailable)) as raised:
                upsert_chunks(client, "Doomed", [chunk], [[1.0] * 384])
            assert time.monotonic() - started < 30
            assert "Weaviate" in raised.value.user_message
    finally:
        stack.down(settings)


def test_a_test_against_a_dead_weaviate_fails_loudly_instead_of_hanging(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path / "data")
    with pytest.raises(IndexUnavailable) as raised, connect_index(settings):
        pass
    assert "not reachable" in raised.value.user_message
    assert "headwater up" in raised.value.user_message
