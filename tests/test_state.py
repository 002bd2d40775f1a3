"""The state store on SQLite and on a real PostgreSQL server: same behaviour on both."""

from __future__ import annotations

import socket
import subprocess
from datetime import datetime

import pytest
from sqlalchemy import text

from headwater.state import SourceBusy, StateStore


def test_migrations_bring_a_new_database_to_the_newest_schema(store: StateStore) -> None:
    with store.engine.connect() as connection:
        version = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from headwater.state import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert version == ScriptDirectory.from_config(config).get_current_head()


def test_only_one_run_holds_a_source_lock(store: StateStore) -> None:
    store.ensure_source("wiki", "confluence")
    owner = store.acquire_lock("wiki")
    with pytest.raises(SourceBusy):
        store.acquire_lock("wiki")
    store.release_lock("wiki", owner)
    store.release_lock("wiki", store.acquire_lock("wiki"))


def test_a_lock_held_by_a_dead_process_is_taken_over(store: StateStore) -> None:
    store.ensure_source("wiki", "confluence")
    finished = subprocess.Popen(["true"])
    finished.wait()  # its PID now names no process
    with store.session() as s:
        s.execute(text("UPDATE sources SET lock_owner = :o, lock_expires = :e WHERE name='wiki'"),
                  {"o": f"{socket.gethostname()}:{finished.pid}:abcd",
                   "e": datetime(2999, 1, 1)})
    assert store.acquire_lock("wiki")


def test_a_batch_commit_records_documents_deletions_and_the_cursor(store: StateStore) -> None:
    store.ensure_source("s3", "s3")
    store.commit_batch("s3", indexed=[("a", "v1", "1:1", "A", 2, ["group:x"]),
                                      ("b", "v1", "1:2", "B", 1, ["public"])],
                       deleted=[], cursor={"after": "b"})
    store.commit_batch("s3", indexed=[], deleted=["a"], cursor={"after": "z"})
    known = store.known_documents("s3")
    assert sorted(known) == ["b"] and known["b"].principals == ["public"]
    assert store.cursor("s3") == {"after": "z"}


def test_quarantine_counts_attempts_and_marks_the_served_version_stale(
    store: StateStore,
) -> None:
    store.ensure_source("s3", "s3")
    store.commit_batch("s3", indexed=[("a", "v1", None, "A", 1, [])], deleted=[])
    store.quarantine("s3", "a", "parse", "corrupt PDF", "v2")
    store.quarantine("s3", "a", "parse", "corrupt PDF", "v2")
    (entry,) = store.quarantined("s3")
    assert (entry.doc_id, entry.attempts, entry.reason) == ("a", 2, "corrupt PDF")
    assert store.document_status("s3", "a") == "stale"
    store.commit_batch("s3", indexed=[("a", "v3", None, "A", 1, [])], deleted=[])
    assert store.quarantined("s3") == [] and store.document_status("s3", "a") == "indexed"


def test_embeddings_are_cached_by_model_and_text_hash(store: StateStore) -> None:
    store.store_vectors("m1", {"h1": b"\x00\x01", "h2": b"\x02"})
    assert store.cached_vectors("m1", ["h1", "h3"]) == {"h1": b"\x00\x01"}
    assert store.cached_vectors("m2", ["h1"]) == {}


def test_a_readers_only_commit_keeps_classification_and_modified_time(store: StateStore) -> None:
    store.ensure_source("s3", "s3")
    store.commit_batch("s3", indexed=[("a", "v1", "1:1", "A", 2, ["group:x"])], deleted=[],
                       subjects={"a": [("hmac1", "PERSON", [0])]},
                       classifications={"a": "confidential"},
                       modified={"a": datetime(2020, 1, 1)})
    # The readers change, nothing else: the row is rewritten without the two columns.
    store.commit_batch("s3", indexed=[("a", "v1", "1:2", "", 2, ["group:y"])], deleted=[],
                       fingerprints=[("a", "1:3")])
    known = store.known_documents("s3")["a"]
    assert (known.principals, known.fingerprint) == (["group:y"], "1:3")
    assert store.document_classification("s3", "a") == "confidential"
    assert store.expired_documents("s3", datetime(2021, 1, 1)) == ["a"]
    assert [d.doc_id for d in store.documents_for_subjects(["hmac1"])] == ["a"]


def test_a_rewritten_document_replaces_its_subjects_and_new_ones_are_added(
    store: StateStore,
) -> None:
    store.ensure_source("s3", "s3")
    docs = [(f"d{i}", "v1", None, "", 1, []) for i in range(1200)]  # more than one IN list
    store.commit_batch("s3", indexed=docs, deleted=[],
                       subjects={d[0]: [("old", "PERSON", [0])] for d in docs})
    store.commit_batch("s3", indexed=docs[:700], deleted=["d1199"],
                       subjects={d[0]: [("new", "EMAIL_ADDRESS", [0])] for d in docs[:700]})
    assert len(store.documents_for_subjects(["old"])) == 1200 - 700 - 1
    assert len(store.documents_for_subjects(["new"])) == 700
    assert store.document_count("s3") == 1199


def test_a_vector_stored_again_keeps_the_cached_one(store: StateStore) -> None:
    store.store_vectors("m1", {"h1": b"\x00\x01"})
    store.store_vectors("m1", {"h1": b"\x09", "h2": b"\x02"})  # a concurrent sync's copy
    assert store.cached_vectors("m1", ["h1", "h2"]) == {"h1": b"\x00\x01", "h2": b"\x02"}
