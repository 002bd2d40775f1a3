"""Quality gates: Great Expectations suites stop bad batches and quarantine bad rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FolderSource

from flows.sync import sync_source
from headwater.errors import QualityGateFailed
from headwater.settings import get_settings
from tasks import ingest, quality
from tasks.parse import ParsedDocument

HEADWATER = str(Path(sys.executable).parent / "headwater")


def _snapshot(folder: FolderSource) -> dict[str, tuple]:
    """Every object of the collection: properties, vector and last update time."""
    objects = folder.client.collections.use(folder.collection).iterator(include_vector=True)
    times = folder.update_times()
    return {str(o.uuid): (o.properties, np.asarray(o.vector["default"]).tobytes(),
                          times[str(o.uuid)]) for o in objects}


def _policies(folder: FolderSource, **changes: object) -> None:
    config = yaml.safe_load(folder.config.read_text())
    config["sources"][0].update(changes)
    folder.config.write_text(yaml.safe_dump(config))


def _write_many(folder: FolderSource, count: int) -> None:
    for i in range(count):
        folder.write(f"note-{i:03}.txt", f"Note {i}: pump station {i} is inspected weekly.")


def test_a_parser_that_returns_empty_text_fails_the_run_and_leaves_the_index_as_it_was(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_many(folder, 8)
    folder.sync()
    before, documents = _snapshot(folder), folder.store.known_documents("handbook")
    for i in range(8):  # every file changed, so every one is parsed again
        folder.write(f"note-{i:03}.txt", f"Note {i}: pump station {i} is inspected daily.")
    # A broken parser: it raises nothing, it just returns no text.
    monkeypatch.setattr(ingest, "parse_document", lambda doc: ParsedDocument(doc, "", []))

    state = sync_source("handbook", return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, QualityGateFailed)
    assert "8 of 8 documents in a batch failed" in error.user_message
    assert "expect_column_values_to_be_between(text_chars)" in error.user_message
    assert _snapshot(folder) == before
    assert folder.store.known_documents("handbook") == documents


def test_a_source_that_returns_nothing_does_not_wipe_500_indexed_documents(
    folder: FolderSource,
) -> None:
    _policies(folder, batch_size=250)
    _write_many(folder, 500)
    assert folder.sync()["new"] == 500
    before = _snapshot(folder)
    for path in folder.docs.iterdir():
        path.unlink()

    state = sync_source("handbook", return_state=True)
    assert state.is_failed()
    message = state.result(raise_on_failure=False).user_message
    assert "would delete 500 of the 500 indexed documents" in message
    assert "--allow-mass-delete" in message
    assert _snapshot(folder) == before

    state = sync_source("handbook", allow_mass_delete=True, return_state=True)
    assert state.is_completed() and state.result()["deleted"] == 500
    assert folder.index() == {}


def test_single_bad_documents_are_quarantined_with_the_expectation_and_the_rest_index(
    folder: FolderSource,
) -> None:
    _policies(folder, principals={"": ["group:staff"], "orphans/": []})
    _write_many(folder, 12)
    # Text a wrong decoding left behind: the parser reads it, the expectation does not pass it.
    folder.write("garbled.txt", "Pump station log: " + "\ufffd" * 12 + " ran all night.")
    folder.write("orphans/readme.md", "# Nobody may read this\n\nIts folder has no readers.")

    summary = folder.sync()
    assert (summary["new"], summary["quarantined"]) == (12, 2)
    assert sorted(folder.index()) == [f"note-{i:03}.txt" for i in range(12)]
    reasons = {q.doc_id: (q.stage, q.reason) for q in folder.store.quarantined("handbook")}
    assert reasons["garbled.txt"][0] == "quality"
    assert "expect_column_values_to_be_between(printable_ratio)" in reasons["garbled.txt"][1]
    assert "expect_column_values_to_be_between(principal_count)" in (
        reasons["orphans/readme.md"][1])
    failed = {r["expectation"]: r for r in summary["quality"] if r["result"] == "FAIL"}
    assert failed["expect_column_values_to_be_between(printable_ratio)"]["unexpected"] == 1

    # Fixed at the source, it is retried on the next run and leaves quarantine.
    folder.write("garbled.txt", "Pump station log: all pumps ran.")
    assert folder.sync()["new"] == 1
    assert "garbled.txt" in folder.index()


def test_a_chunk_with_a_broken_vector_quarantines_its_document_only(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_many(folder, 5)
    folder.write("nan.txt", "This one will get a broken vector.")
    real = ingest.embed_texts

    def embed_with_a_nan(model, name, texts, store, batch_size):
        result = real(model, name, texts, store, batch_size)
        result.vectors[[i for i, t in enumerate(texts) if "broken" in t]] = np.nan
        return result

    monkeypatch.setattr(ingest, "embed_texts", embed_with_a_nan)
    summary = folder.sync()
    assert (summary["new"], summary["quarantined"]) == (5, 1)
    assert "nan.txt" not in folder.index() and len(folder.index()) == 5
    (held,) = folder.store.quarantined("handbook")
    assert "expect_column_values_to_be_between(norm)" in held.reason


def test_quality_report_prints_the_last_run_and_data_docs_are_written(
    folder: FolderSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(data_dir))
    get_settings.cache_clear()
    _write_many(folder, 3)
    first = folder.sync()
    folder.write("note-000.txt", "Note 0: the pump station was rebuilt.")
    folder.sync()

    env = {**os.environ, **folder.env, "HEADWATER_DATA_DIR": str(data_dir)}
    report = subprocess.run([HEADWATER, "quality", "report"], capture_output=True, text=True,
                            env=env)
    assert report.returncode == 0, report.stderr
    suites = [quality.load_suite(n) for n in quality.SUITES]
    for suite in suites:
        for e in suite["expectations"]:
            assert f"| {suite['name']} | {e['type']}({e['kwargs']['column']}) |" in report.stdout
    assert "| 0 of 1 rows unexpected" in report.stdout  # the last run saw one changed note
    expectations = sum(len(s["expectations"]) for s in suites)
    assert f"{expectations} of {expectations} expectations passed" in report.stdout

    runs = folder.store.finished_run(source="handbook")
    older = subprocess.run([HEADWATER, "quality", "report", "--run", "no-such-run"],
                           capture_output=True, text=True, env=env)
    assert older.returncode == 1 and "no finished sync run with id no-such-run" in older.stderr
    assert runs is not None and first["data_docs"]

    docs = data_dir / "quality" / "data-docs"
    assert (docs / "index.html").is_file()
    pages = list((docs / "validations").rglob("*.html"))
    assert {p.parts[len(docs.parts) + 1] for p in pages} == {"documents", "chunks"}
    assert "handbook" in (docs / "index.html").read_text()
