"""The audit trail: hash-chained entries that prove themselves intact or name where they broke."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FolderSource
from sqlalchemy import text

from headwater.state import StateStore

HEADWATER = str(Path(sys.executable).parent / "headwater")


def _headwater(store: StateStore, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HEADWATER_STATE_DB_URL": store.engine.url.render_as_string(
        hide_password=False)}
    return subprocess.run([HEADWATER, *args], capture_output=True, text=True, env=env)


def _fill(store: StateStore, count: int = 6) -> None:
    for i in range(count):
        store.append_audit(f"user:u{i}", "query", "collection:Test", "answered",
                           f"req-{i}", {"sources": i})


def test_an_untouched_trail_verifies(store: StateStore) -> None:
    _fill(store)
    verdict = store.verify_audit()
    assert verdict.intact and verdict.checked == 6
    done = _headwater(store, "audit", "verify")
    assert done.returncode == 0, done.stderr
    # The check itself is recorded, so the trail had 7 entries when it finished.
    assert "audit trail intact: 6 entries" in done.stdout
    assert store.audit_entries("audit.verify")[0].outcome == "intact"


@pytest.mark.parametrize("tampering, broken_at, reason", [
    ("UPDATE audit_log SET outcome = 'denied' WHERE id = 3", 3, "contents do not match"),
    ("UPDATE audit_log SET actor = 'user:someone-else' WHERE id = 5", 5, "contents do not match"),
    ("DELETE FROM audit_log WHERE id = 2", 3, "does not follow the entry before it"),
    ("DELETE FROM audit_log WHERE id = 6", 5, "ends before the recorded head"),
])
def test_editing_or_removing_one_row_breaks_verification_and_names_it(
    store: StateStore, tampering: str, broken_at: int, reason: str
) -> None:
    _fill(store)
    with store.engine.begin() as connection:
        connection.execute(text(tampering))
    verdict = store.verify_audit()
    assert not verdict.intact and verdict.broken_id == broken_at and reason in verdict.reason

    done = _headwater(store, "audit", "verify")
    assert done.returncode == 1
    assert f"audit trail BROKEN at entry {broken_at}:" in done.stderr


def test_export_writes_every_entry_as_a_json_line(store: StateStore, tmp_path: Path) -> None:
    _fill(store, 4)
    out = tmp_path / "audit.jsonl"
    done = _headwater(store, "audit", "export", "--output", str(out))
    assert done.returncode == 0 and "wrote 4 audit entries" in done.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["request_id"] for e in lines] == ["req-0", "req-1", "req-2", "req-3"]
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(lines))
    assert set(lines[0]) == {"id", "at", "actor", "action", "resource", "outcome",
                             "request_id", "details", "prev_hash", "hash"}
    # The export is an admin action of its own; a second export picks up from an id.
    assert store.audit_entries("audit.export")[0].details == {"entries": 4, "since_id": 0}
    later = _headwater(store, "audit", "export", "--since-id", str(lines[-1]["id"]))
    assert [json.loads(line)["action"] for line in later.stdout.splitlines()] == [
        "audit.export"]


def test_a_sync_records_its_decisions_in_the_trail(folder: FolderSource) -> None:
    folder.write("leave.md", "# Leave\n\nEvery employee has 25 days of annual leave.")
    folder.write("broken.pdf", b"%PDF-1.4 this is not really a pdf")
    summary = folder.sync()
    (run,) = folder.store.audit_entries("ingest.sync")
    assert (run.actor, run.resource, run.outcome) == ("system:sync", "source:handbook",
                                                      "completed")
    assert run.details["new"] == 1 and run.details["quarantined"] == 1 == summary["quarantined"]
    (rejected,) = folder.store.audit_entries("ingest.quarantine")
    assert rejected.resource == "handbook:broken.pdf" and rejected.request_id == run.request_id
    assert rejected.details["stage"] == "parse"
    assert folder.store.verify_audit().intact


def _append_many(url: str, writer: int, count: int) -> None:
    store = StateStore(url)
    for i in range(count):
        store.append_audit(f"user:w{writer}", "query", "api", "answered", f"w{writer}-{i}")


def test_processes_appending_at_once_keep_one_unbroken_chain(store: StateStore) -> None:
    import multiprocessing

    url = store.engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(url, w, 25)) for w in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    verdict = store.verify_audit()
    assert verdict.intact, verdict
    assert verdict.checked == 100
