"""Data-subject requests and retention: found by keyed hash, erased for good, audited."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import FolderSource
from pydantic import SecretStr
from typer.testing import CliRunner

from headwater.records import Chunk
from headwater.settings import get_settings
from headwater.state import StateStore
from tasks import compliance, privacy
from tasks.embed import encode, load_embedder, load_model

KEY = "subject-key-of-the-privacy-tests-0123456789"
JANE = "jane.roe@example.com"

CONTACTS = ("# Spares desk\n\nImpeller seals are kept in hall two, left of the door.\n\n"
            f"## Orders\n\nOrders for gaskets go to {JANE} before noon on weekdays.\n\n"
            "## Stock\n\nThe stock of flange bolts is counted every Friday afternoon.")
REFUNDS = (f"# Refunds\n\nQuestions about a refund of a pump repair: {JANE}.\n\n"
           "## Policy\n\nRefunds for valve repairs take ten working days.")
PLAIN = "Pump station inspections are weekly. The duty desk is ops@example.com."


def _configure(folder: FolderSource, monkeypatch: pytest.MonkeyPatch, **changes: object) -> None:
    config = yaml.safe_load(folder.config.read_text())
    config["sources"][0].update(changes)
    folder.config.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HEADWATER_SUBJECT_KEY", KEY)
    get_settings.cache_clear()


def _corpus(folder: FolderSource, monkeypatch: pytest.MonkeyPatch) -> dict:
    _configure(folder, monkeypatch, policy=["gdpr"])
    folder.write("desk/contacts.md", CONTACTS)
    folder.write("finance/refunds.md", REFUNDS)
    folder.write("plain.txt", PLAIN)
    summary = folder.sync()
    assert (summary["new"], summary["quarantined"]) == (3, 0), summary
    return summary


def _request(kind: str, **options: object) -> privacy.PrivacyResult:
    from flows.privacy import data_subject_request

    # Spelled differently from the documents: the request normalizes as the index did.
    return data_subject_request(kind, {"EMAIL_ADDRESS": SecretStr(" Jane.Roe@Example.com")},
                                "officer@corp.example", **options)


def _chunks(folder: FolderSource) -> dict[tuple[str, int], dict]:
    return {(o.properties["doc_id"], o.properties["ordinal"]): {**o.properties, "uuid": o.uuid}
            for o in folder.client.collections.use(folder.collection).iterator()}


def _state_bytes(folder: FolderSource) -> bytes:
    db = Path(folder.env["HEADWATER_STATE_DB_URL"].removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def _jane() -> str:
    return compliance.subject_hmac(JANE, "EMAIL_ADDRESS", SecretStr(KEY))


# -- through the real sync flow and Weaviate ----------------------------------------------------


def test_access_and_portability_list_exactly_the_documents_mentioning_the_subject(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from headwater.cli import app

    _corpus(folder, monkeypatch)
    output = tmp_path / "jane.json"
    done = CliRunner().invoke(app, ["privacy", "access", "--email", "JANE.ROE@example.com",
                                    "--requested-by", "officer@corp.example", "--output",
                                    str(output)])
    assert done.exit_code == 0, done.output
    assert "privacy.access" not in done.output and "| documents | 2 |" in done.output
    assert JANE not in done.output.lower()

    export = json.loads(output.read_text())
    assert export["subjects"] == [{"entity_type": "EMAIL_ADDRESS", "subject": _jane()}]
    found = {d["doc_id"]: d for d in export["results"]}
    assert sorted(found) == ["desk/contacts.md", "finance/refunds.md"]  # not plain.txt
    contacts = found["desk/contacts.md"]
    assert contacts["entity_types"] == ["EMAIL_ADDRESS"]
    assert contacts["classification"] == "confidential"
    assert contacts["url"].startswith("file://") and contacts["title"] == "contacts"
    # The chunks as indexed: the one that mentions her, already rewritten by the policy.
    assert [c["ordinal"] for c in contacts["chunks"]] == [1]
    assert "go to <EMAIL_ADDRESS> before noon" in contacts["chunks"][0]["text"]
    assert JANE not in output.read_text().lower()

    portable = _request("portability")
    lines = [json.loads(line) for line in Path(portable.export_path).read_text().splitlines()]
    assert lines[0]["record"] == "request" and lines[0]["format"] == privacy.PORTABILITY_FORMAT
    assert Path(portable.export_path).is_relative_to(get_settings().data_dir / "privacy")
    assert oct(Path(portable.export_path).stat().st_mode & 0o777) == "0o600"
    assert {d["doc_id"] for d in lines[1:]} == set(found)
    assert all(d["record"] == "document" for d in lines[1:])
    assert (portable.documents, portable.chunks) == (2, 2)


def test_erased_subject_stays_erased_after_full_resync(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corpus(folder, monkeypatch)
    before = _chunks(folder)
    erased_keys = [("desk/contacts.md", 1), ("finance/refunds.md", 0)]
    survivors = sorted(set(before) - set(erased_keys))
    erased = [before[k] for k in erased_keys]
    settings = get_settings()
    # The cache keeps each backend's vectors under the backend's own key.
    cache_key = load_embedder(settings.embedding_model, settings.embedding_backend).cache_key
    model_name = settings.embedding_model
    assert len(folder.store.cached_vectors(cache_key, [c["text_hash"] for c in erased])) == 2

    result = _request("erasure")
    assert (result.outcome, result.documents, result.chunks_erased) == ("completed", 2, 2)
    assert result.cached_vectors_removed == 2

    def assert_erased() -> None:
        now = _chunks(folder)
        assert sorted(now) == survivors  # other chunks of the same documents survive
        collection = folder.client.collections.use(folder.collection)
        model = load_model(model_name)
        gone = {c["uuid"] for c in erased}
        for chunk in erased:
            words = chunk["text"].replace("<EMAIL_ADDRESS>", " ")
            assert not gone & {o.uuid for o in collection.query.bm25(query=words,
                                                                     limit=10).objects}
            vector = encode(model, [chunk["text"]])[0].tolist()
            assert not gone & {o.uuid for o in collection.query.near_vector(
                near_vector=vector, limit=10).objects}
        assert folder.store.documents_for_subjects([_jane()]) == []

    assert_erased()
    # The embedding cache no longer holds their vectors; the survivors' stay.
    assert folder.store.cached_vectors(cache_key, [c["text_hash"] for c in erased]) == {}
    assert len(folder.store.cached_vectors(
        cache_key, [before[k]["text_hash"] for k in survivors])) == len(survivors)

    # Audited at start and end, by hash; the raw e-mail is nowhere in the state store.
    entries = folder.store.audit_entries("privacy.erasure")
    assert [e.outcome for e in entries] == ["started", "completed"]
    assert {e.actor for e in entries} == {"officer@corp.example"}
    assert all(_jane() in e.resource for e in entries)
    assert entries[1].details["chunks_erased"] == 2
    stored = _state_bytes(folder).lower()
    assert JANE.encode() not in stored and b"jane.roe" not in stored

    # Neither an incremental nor a full re-sync brings her back; withheld, not an error.
    assert folder.sync()["suppressed"] == 0
    summary = folder.sync(full=True)
    assert (summary["suppressed"], summary["quarantined"]) == (2, 0), summary
    assert_erased()

    # A new version of a document keeps its erased chunk out, and its ordinals in place.
    folder.write("desk/contacts.md", CONTACTS.replace("every Friday", "every Monday"))
    summary = folder.sync()
    assert (summary["changed"], summary["suppressed"]) == (1, 1), summary
    assert sorted(k for k in _chunks(folder) if k[0] == "desk/contacts.md") == [
        ("desk/contacts.md", 0), ("desk/contacts.md", 2)]
    assert "every Monday" in _chunks(folder)[("desk/contacts.md", 2)]["text"]

    # Readers change in place around the gap the erased chunk left.
    _configure(folder, monkeypatch, principals={"": ["group:staff"], "desk/": ["group:desk"]})
    summary = folder.sync()
    assert (summary["permissions"], summary["embedded"]) == (1, 0), summary
    assert {tuple(c["principals"]) for k, c in _chunks(folder).items()
            if k[0] == "desk/contacts.md"} == {("group:desk",)}


def test_erasure_withdraws_stored_answers_built_from_an_erased_document(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import get_client

    from flows.query import answer_query

    _corpus(folder, monkeypatch)
    # Answers of the `answer-query` deployment outlive their run in Prefect's result storage.
    quoting = answer_query("Where do orders for gaskets go before noon?", ["group:staff"])
    assert "gaskets go to <EMAIL_ADDRESS>" in json.dumps(quoting)
    asked = answer_query("Where do orders for gaskets go before noon?", ["group:staff"],
                         return_state=True)
    unrelated = answer_query("How often are pump station inspections?", ["group:staff"],
                             top_k=1, return_state=True)
    assert [s["doc_id"] for s in unrelated.result()["sources"]] == ["plain.txt"]

    result = _request("erasure")
    assert result.answers_withdrawn == 2  # both runs that were built from her documents

    def stored(state: object) -> dict:
        with get_client(sync_client=True) as client:
            return client.read_flow_run(state.state_details.flow_run_id).state.result()

    withdrawn = stored(asked)
    assert withdrawn["answer"] == privacy.WITHDRAWN_ANSWER and withdrawn["sources"] == []
    assert "gaskets" not in json.dumps(withdrawn)
    assert stored(unrelated)["sources"][0]["doc_id"] == "plain.txt"  # untouched
    entries = folder.store.audit_entries("answer.withdrawn")
    assert {e.request_id for e in entries} == {result.request_id}
    assert len(entries) == 2 and all(e.outcome == "withdrawn" for e in entries)
    assert f"flow-run:{asked.state_details.flow_run_id}" in {e.resource for e in entries}
    assert _request("erasure").answers_withdrawn == 0  # each answer is withdrawn once


def test_rectification_erases_the_old_value_and_reads_the_corrected_source(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    _corpus(folder, monkeypatch)
    folder.write("finance/refunds.md", REFUNDS.replace(JANE, "jane.smith@example.com"))

    result = _request("rectification")
    assert result.resynced_sources == ["handbook"]
    assert "source" in result.message and "truth" in result.message
    assert folder.store.documents_for_subjects([_jane()]) == []
    corrected = compliance.subject_hmac("jane.smith@example.com", "EMAIL_ADDRESS",
                                        SecretStr(KEY))
    assert [d.doc_id for d in folder.store.documents_for_subjects([corrected])] == [
        "finance/refunds.md"]
    assert ("finance/refunds.md", 0) in _chunks(folder)  # the corrected chunk is indexed
    assert ("desk/contacts.md", 1) not in _chunks(folder)  # the old value stays erased


def test_retention_purge_removes_old_documents_and_a_resync_does_not_bring_them_back(
    folder: FolderSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.privacy import retention_purge

    folder.write("old.txt", "The 2019 pump overhaul plan for station four.")
    folder.write("new.txt", "The current pump overhaul plan for station four.")
    long_ago = time.time() - 400 * 86400
    os.utime(folder.docs / "old.txt", (long_ago, long_ago))
    assert folder.sync()["new"] == 2  # no retention yet: both are indexed
    assert retention_purge() == []  # and nothing is purged

    _configure(folder, monkeypatch, retention={"days": 30})
    (result,) = retention_purge()
    assert (result.source, result.outcome, result.documents) == ("handbook", "completed", 1)
    assert result.chunks_deleted == 1 and result.cached_vectors_removed == 1
    assert sorted(folder.index()) == ["new.txt"]
    assert sorted(folder.store.known_documents("handbook")) == ["new.txt"]
    (entry,) = folder.store.audit_entries("privacy.retention")
    assert (entry.resource, entry.details["documents"]) == ("source:handbook", 1)

    for full in (False, True):
        summary = folder.sync(full=full)
        assert (summary["new"], summary["expired"], summary["quarantined"]) == (0, 1, 0)
        assert "30 days" in summary["message"]
        assert sorted(folder.index()) == ["new.txt"]
    assert folder.store.quarantined("handbook") == []


# -- the state store's side, on SQLite and PostgreSQL -------------------------------------------


def test_suppression_list_and_erasure_bookkeeping_work_on_both_databases(
    store: StateStore,
) -> None:
    from datetime import UTC, datetime, timedelta

    jane, john = "a" * 64, "b" * 64
    store.suppress_subjects([(jane, "EMAIL_ADDRESS")], "chunks", "r1")
    store.suppress_subjects([(jane, "EMAIL_ADDRESS"), (john, "PERSON")], "chunks", "r2")
    assert store.suppressed_subjects() == {jane: "chunks", john: "chunks"}
    store.suppress_subjects([(john, "PERSON")], "document", "r3")  # the wider scope wins
    store.suppress_subjects([(john, "PERSON")], "chunks", "r4")
    assert store.suppressed_subjects() == {jane: "chunks", john: "document"}

    old = datetime.now(UTC) - timedelta(days=90)
    store.ensure_source("wiki", "s3")
    store.commit_batch("wiki", indexed=[("a", "v1", "f", "A", 3, []),
                                        ("b", "v1", "f", "B", 2, [])], deleted=[],
                       subjects={"a": [(jane, "EMAIL_ADDRESS", [0, 2]), (john, "PERSON", [2])],
                                 "b": [(john, "PERSON", [0, 1])]},
                       modified={"a": old, "b": datetime.now(UTC)})
    assert store.forget_chunks("wiki", {"a": [0, 2]}, [jane]) == 2
    assert store.documents_for_subjects([jane, john]) == [("wiki", "b", [0, 1], ["PERSON"])]

    assert store.expired_documents("wiki", datetime.now(UTC) - timedelta(days=30)) == ["a"]
    store.mark_for_reread("wiki", ["a"])
    assert store.known_documents("wiki")["a"].version == ""
    assert store.known_documents("wiki")["a"].chunk_count == 3  # ordinals keep their places

    store.store_vectors("m", {"h1": b"1", "h2": b"2"})
    assert store.forget_vectors(["h1", "h3"]) == 1
    assert store.cached_vectors("m", ["h1", "h2"]) == {"h2": b"2"}


# -- plain logic ---------------------------------------------------------------------------------


def _chunk(ordinal: int, start: int, end: int, heading: list[str] | None = None) -> Chunk:
    return Chunk(source="s", doc_id="d", ordinal=ordinal, text="x", char_start=start,
                 char_end=end, heading_path=heading or [])


def test_withheld_chunks_are_those_mentioning_a_suppressed_subject_and_it_leaves_findings() -> None:
    jane, john = "a" * 64, "b" * 64
    found = compliance.DocumentFindings("confidential", text=[
        compliance.Finding("EMAIL_ADDRESS", 15, 30, jane),
        compliance.Finding("PERSON", 45, 50, john)])
    chunks = [_chunk(0, 0, 10), _chunk(1, 10, 40), _chunk(2, 40, 60)]
    kept, withheld = found.withhold(chunks, {jane: "chunks"})
    assert ([c.ordinal for c in kept], withheld) == ([0, 2], [1])
    assert found.subjects(kept) == [(john, "PERSON", [2])]  # jane is not indexed again

    heading = compliance.DocumentFindings("confidential", headings={
        "Contact": [compliance.Finding("PERSON", 0, 8, john)]})
    chunks = [_chunk(0, 0, 10), _chunk(1, 10, 20, ["Contact"])]
    assert heading.withhold(chunks, {john: "chunks"})[1] == [1]
    whole = compliance.DocumentFindings("confidential", text=[
        compliance.Finding("PERSON", 0, 5, john)])
    assert whole.withhold(chunks, {john: "document"}) == ([], [0, 1])
    assert whole.withhold(chunks, {jane: "document"}) == (chunks, [])


def test_identifiers_are_hashed_as_the_subject_index_hashes_them() -> None:
    refs = privacy.subject_refs({"EMAIL_ADDRESS": SecretStr(" JANE.ROE@example.com"),
                                 "PHONE_NUMBER": ["+44 20 7946 0958", "+442079460958"]},
                                SecretStr(KEY))
    assert [(r.entity_type, r.subject) for r in refs] == [
        ("EMAIL_ADDRESS", _jane()),
        ("PHONE_NUMBER", compliance.subject_hmac("+44 20 7946 0958", "PHONE_NUMBER",
                                                 SecretStr(KEY)))]
    with pytest.raises(privacy.PrivacyRequestError, match="unknown identifier types"):
        privacy.subject_refs({"SHOE_SIZE": "44"}, SecretStr(KEY))
    with pytest.raises(privacy.PrivacyRequestError, match="at least one identifier"):
        privacy.subject_refs({"EMAIL_ADDRESS": " "}, SecretStr(KEY))
    with pytest.raises(privacy.PrivacyRequestError, match="HEADWATER_SUBJECT_KEY"):
        privacy.subject_refs({"EMAIL_ADDRESS": JANE}, None)

