"""`sync_source` against the real Weaviate and Prefect servers: the index equals the folder."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import FolderSource
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from weaviate.classes.query import Filter

from flows.sync import sync_source
from headwater.errors import QualityGateFailed
from headwater.settings import get_settings
from tasks import quality

HEADWATER = str(Path(sys.executable).parent / "headwater")


def _corpus(folder: FolderSource) -> None:
    folder.write("leave.md", "# Leave\n\nAnnual leave is 25 days a year.\n\n## Sick leave\n\n"
                             "Tell your manager before 9am on the first day.\n")
    folder.write("vpn.txt", "Connect to the VPN with the corporate client before opening "
                            "internal sites.\n")
    folder.write("hr/salaries.csv", "role,band\nengineer,B3\nmanager,B4\n")
    folder.write("about.html", "<html><head><title>About us</title></head><body><nav>menu"
                               "</nav><h1>About</h1><p>We build water pumps.</p></body></html>")


def test_first_sync_indexes_every_document_once(folder: FolderSource) -> None:
    _corpus(folder)
    summary = folder.sync()
    assert summary["new"] == 4 and summary["quarantined"] == 0
    index = folder.index()
    assert sorted(index) == ["about.html", "hr/salaries.csv", "leave.md", "vpn.txt"]
    assert any("25 days" in t for t in index["leave.md"])
    assert "menu" not in " ".join(index["about.html"])  # boilerplate dropped
    hr = folder.client.collections.use(folder.collection).query.fetch_objects(
        filters=Filter.by_property("doc_id").equal("hr/salaries.csv"))
    assert hr.objects[0].properties["principals"] == ["group:hr"]


def test_each_run_publishes_its_summary_as_a_prefect_artifact(folder: FolderSource) -> None:
    _corpus(folder)
    state = sync_source("handbook", return_state=True)

    async def artifacts() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )

    by_key = {a.key: a for a in asyncio.run(artifacts())}
    assert sorted(by_key) == ["quality-handbook", "sync-handbook"]
    assert "| new | 4 |" in by_key["sync-handbook"].data
    assert "| embed |" in by_key["sync-handbook"].data

    # Every expectation of both versioned suites is listed with what it observed.
    rows = json.loads(by_key["quality-handbook"].data)
    suites = {name: quality.load_suite(name)["expectations"] for name in quality.SUITES}
    assert [(r["suite"], r["expectation"]) for r in rows] == [
        (name, f"{e['type']}({e['kwargs']['column']})")
        for name, expectations in suites.items() for e in expectations]
    assert all(r["result"] == "pass" and r["checked"] > 0 for r in rows), rows
    norm = next(r for r in rows if r["expectation"].endswith("(norm)"))
    assert norm["observed"].startswith("0 of ") and "values 1..1" in norm["observed"]


def test_index_matches_the_folder_after_add_modify_rename_delete(folder: FolderSource) -> None:
    _corpus(folder)
    folder.sync()
    folder.write("leave.md", "# Leave\n\nAnnual leave is 30 days a year.\n")
    folder.write("new.txt", "A brand new onboarding checklist.\n")
    (folder.docs / "vpn.txt").rename(folder.docs / "network-vpn.txt")
    (folder.docs / "about.html").unlink()

    summary = folder.sync()
    assert (summary["new"], summary["changed"], summary["deleted"]) == (2, 1, 2)
    index = folder.index()
    assert sorted(index) == ["hr/salaries.csv", "leave.md", "network-vpn.txt", "new.txt"]
    assert index["leave.md"] == ["Leave\n\nAnnual leave is 30 days a year."]
    assert not any("25 days" in t for texts in index.values() for t in texts)
    assert folder.store.document_count("handbook") == 4


def test_a_shrunken_document_keeps_no_stale_chunks(folder: FolderSource) -> None:
    long_text = "\n\n".join(f"Paragraph {i}. " + "The pump needs service. " * 40
                            for i in range(8))
    folder.write("manual.txt", long_text)
    folder.sync()
    assert len(folder.index()["manual.txt"]) > 3
    folder.write("manual.txt", "Short now.")
    folder.sync()
    assert folder.index() == {"manual.txt": ["Short now."]}


def test_a_second_sync_without_changes_embeds_and_writes_nothing(folder: FolderSource) -> None:
    _corpus(folder)
    folder.sync()
    before = folder.update_times()
    summary = folder.sync()
    assert summary["unchanged"] == 4
    assert (summary["embedded"], summary["chunks_written"], summary["chunks_deleted"]) == (0, 0, 0)
    assert folder.update_times() == before


def test_a_touched_file_is_not_embedded_again(folder: FolderSource) -> None:
    _corpus(folder)
    folder.sync()
    path = folder.docs / "vpn.txt"
    os.utime(path, (time.time() + 60, time.time() + 60))
    summary = folder.sync()
    assert summary["embedded"] == 0 and summary["chunks_written"] == 0
    assert summary["changed"] == 0


def test_a_full_sync_rereads_everything_but_reuses_embeddings(folder: FolderSource) -> None:
    _corpus(folder)
    folder.sync()
    before = folder.index()
    summary = folder.sync(full=True)
    assert summary["changed"] == 4 and summary["embedded"] == 0
    assert folder.index() == before


def test_bad_files_are_quarantined_with_a_reason_while_the_rest_index(
    folder: FolderSource,
) -> None:
    _corpus(folder)
    notes = [f"notes/note-{i:02}.txt" for i in range(12)]
    for note in notes:  # enough good documents that four bad ones stay under the batch limit
        folder.write(note, f"Meeting note {note}: the pump order was approved.")
    folder.write("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage without xref")
    folder.write("empty.txt", b"")
    folder.write("blob.txt", bytes(range(256)) * 64)
    with (folder.docs / "huge.txt").open("wb") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: 200 MB without writing them

    summary = folder.sync()
    assert summary["new"] == 16 and summary["quarantined"] == 4
    assert sorted(folder.index()) == sorted(
        ["about.html", "hr/salaries.csv", "leave.md", "vpn.txt", *notes])
    reasons = {q.doc_id: q.reason for q in folder.store.quarantined("handbook")}
    assert reasons["broken.pdf"].startswith("corrupt PDF")
    assert reasons["empty.txt"] == "empty file (0 bytes)"
    assert reasons["blob.txt"].startswith("binary content in a text file")
    assert reasons["huge.txt"].startswith("file too large: 209.7 MB")

    # The next run retries them; a repaired file leaves quarantine and is indexed.
    folder.write("empty.txt", "Now it has words.")
    summary = folder.sync()
    assert summary["new"] == 1 and summary["quarantined"] == 3
    attempts = {q.doc_id: q.attempts for q in folder.store.quarantined("handbook")}
    assert attempts == {"blob.txt": 2, "broken.pdf": 2, "huge.txt": 2}
    listing = subprocess.run([HEADWATER, "quarantine", "--source", "handbook"],
                             capture_output=True, text=True, env={**os.environ, **folder.env})
    assert "broken.pdf" in listing.stdout and "corrupt PDF" in listing.stdout

    # A rejected file that is deleted leaves quarantine too.
    (folder.docs / "blob.txt").unlink()
    folder.sync()
    assert sorted(q.doc_id for q in folder.store.quarantined("handbook")) == [
        "broken.pdf", "huge.txt"]


def test_a_permission_change_reaches_the_index_without_reembedding(
    folder: FolderSource,
) -> None:
    _corpus(folder)
    folder.sync()
    (folder.docs / "leave.md").rename(folder.docs / "hr" / "leave.md")
    folder.sync()
    readers = folder.client.collections.use(folder.collection).query.fetch_objects(
        filters=Filter.by_property("doc_id").equal("hr/leave.md"))
    assert {tuple(o.properties["principals"]) for o in readers.objects} == {("group:hr",)}


def _start_cli_sync(folder: FolderSource) -> subprocess.Popen:
    # Output goes to a file: a pipe nobody reads until the end fills up and stalls the sync.
    output = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the run)
    run = subprocess.Popen([HEADWATER, "sync", "handbook"], env={**os.environ, **folder.env},
                           stdout=output, stderr=subprocess.STDOUT, text=True)
    run.output = output  # type: ignore[attr-defined]
    return run


def _output(run: subprocess.Popen) -> str:
    run.output.seek(0)  # type: ignore[attr-defined]
    return run.output.read()  # type: ignore[attr-defined]


def _many_documents(folder: FolderSource, count: int) -> None:
    for i in range(count):
        folder.write(f"notes/meeting-{i:03}.md", f"# Meeting {i}\n\nWe agreed on item {i}. "
                     + "Follow-up actions were assigned. " * 30)


def _wait_until_committed(folder: FolderSource, run: subprocess.Popen, documents: int) -> None:
    """Until the running sync has committed at least this many documents."""
    deadline = time.monotonic() + 240
    while folder.store.document_count("handbook") < documents:
        assert run.poll() is None, _output(run)
        assert time.monotonic() < deadline, "the sync never committed a batch"
        time.sleep(0.05)


def test_a_run_killed_between_batches_resumes_to_the_exact_index(
    tmp_path, collection, weaviate_client, monkeypatch
) -> None:
    folder = FolderSource(tmp_path, collection, weaviate_client, monkeypatch, batch_size=2)
    _many_documents(folder, 40)
    run = _start_cli_sync(folder)
    _wait_until_committed(folder, run, 4)
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    committed = folder.store.document_count("handbook")
    assert 4 <= committed < 40

    # Between the crash and the re-run, one indexed file goes and one unindexed file changes.
    (folder.docs / "notes" / "meeting-000.md").unlink()
    folder.write("notes/meeting-039.md", "# Meeting 39\n\nRescheduled.")
    folder.sync()
    index = folder.index()
    assert sorted(index) == [f"notes/meeting-{i:03}.md" for i in range(1, 40)]
    assert index["notes/meeting-039.md"] == ["Meeting 39\n\nRescheduled."]
    assert sum(map(len, index.values())) == len(folder.update_times())  # no duplicates


def test_two_concurrent_syncs_of_one_source_do_not_both_run(
    tmp_path, collection, weaviate_client, monkeypatch
) -> None:
    folder = FolderSource(tmp_path, collection, weaviate_client, monkeypatch, batch_size=2)
    # Enough batches that the first run is still going when the second one starts.
    _many_documents(folder, 150)
    first = _start_cli_sync(folder)
    _wait_until_committed(folder, first, 1)

    second = sync_source("handbook", return_state=True)
    assert second.is_cancelled()
    assert "already being synced" in second.message
    assert first.wait(timeout=240) == 0, _output(first)
    assert folder.store.document_count("handbook") == 150


def test_a_postgresql_state_store_gives_the_same_index(
    tmp_path, collection, weaviate_client, monkeypatch, postgres_url
) -> None:
    folder = FolderSource(tmp_path, collection, weaviate_client, monkeypatch,
                          state_db_url=postgres_url)
    _corpus(folder)
    assert folder.sync()["new"] == 4
    (folder.docs / "vpn.txt").unlink()
    folder.write("leave.md", "# Leave\n\nAnnual leave is 30 days a year.\n")
    summary = folder.sync()
    assert (summary["changed"], summary["deleted"], summary["embedded"]) == (1, 1, 1)
    assert sorted(folder.index()) == ["about.html", "hr/salaries.csv", "leave.md"]


def test_a_batch_that_mostly_fails_to_parse_stops_the_run_and_writes_nothing(
    folder: FolderSource,
) -> None:
    for i in range(8):
        folder.write(f"policy-{i}.md", f"# Policy {i}\n\nRule number {i} applies to everyone.\n")
    folder.sync()
    before, contents = folder.update_times(), folder.index()
    for i in range(8):  # a broken export: every file now holds no text
        folder.write(f"policy-{i}.md", "   \n\n   \n")

    state = sync_source("handbook", return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, QualityGateFailed)
    assert "8 of 8 documents in a batch failed" in error.user_message
    assert folder.update_times() == before and folder.index() == contents


def test_an_emptied_source_does_not_wipe_the_index_unless_allowed(folder: FolderSource) -> None:
    for i in range(40):
        folder.write(f"doc-{i:02}.txt", f"Document number {i} about pump maintenance.")
    folder.sync()
    for path in folder.docs.iterdir():
        path.unlink()

    state = sync_source("handbook", return_state=True)
    assert state.is_failed()
    assert "would delete 40 of the 40 indexed documents" in str(
        state.result(raise_on_failure=False))
    assert len(folder.index()) == 40 and folder.store.document_count("handbook") == 40

    refused = subprocess.run([HEADWATER, "sync", "handbook"], capture_output=True, text=True,
                             env={**os.environ, **folder.env})
    assert refused.returncode == 1 and "--allow-mass-delete" in refused.stderr

    state = sync_source("handbook", allow_mass_delete=True, return_state=True)
    assert state.is_completed() and state.result()["deleted"] == 40
    assert folder.index() == {} and folder.store.document_count("handbook") == 0


def test_a_few_deletions_pass_the_guard(folder: FolderSource) -> None:
    for i in range(20):
        folder.write(f"doc-{i:02}.txt", f"Document number {i} about pump maintenance.")
    folder.sync()
    for i in range(5):
        (folder.docs / f"doc-{i:02}.txt").unlink()
    assert folder.sync()["deleted"] == 5
    assert len(folder.index()) == 15


def test_a_new_policy_rereads_what_was_indexed_before_it(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder.write("contact.md", "# Contact\n\nWrite to jane.roe@example.com for pump spares.")
    folder.write("leave.md", "# Leave\n\nEvery employee has 25 days of annual leave.")
    folder.sync()
    assert "jane.roe@example.com" in folder.index()["contact.md"][0]

    monkeypatch.setenv("HEADWATER_SUBJECT_KEY", "a-test-subject-key-of-enough-length")
    config = yaml.safe_load(folder.config.read_text())
    config["sources"][0]["policy"] = ["gdpr"]
    folder.config.write_text(yaml.safe_dump(config))
    get_settings.cache_clear()

    summary = folder.sync()
    assert summary["changed"] == 2 and "policy, chunking or embedding model changed" in (
        summary["message"])
    assert "jane.roe@example.com" not in json.dumps(folder.index())
    assert "<EMAIL_ADDRESS>" in folder.index()["contact.md"][0]
    settled = folder.sync()
    assert (settled["changed"], settled["embedded"], settled["message"]) == (0, 0, "")
