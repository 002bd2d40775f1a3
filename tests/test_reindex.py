"""`reindex`: a new versioned collection is built beside the one in use and the alias switched to
it, while questions keep being answered from one or the other, never from neither."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import yaml
from conftest import FolderSource

from flows.reindex import reindex
from headwater.records import QueryFilters
from headwater.settings import get_settings
from tasks.embed import query_encoder
from tasks.index import alias_target, connect_index, index_versions
from tasks.retrieve import retrieve

QUESTION = "How many days of annual leave do we get?"


def _corpus(folder: FolderSource) -> None:
    folder.write("leave.md", "# Leave\n\nAnnual leave is 25 days a year.\n\n## Sick leave\n\n"
                             "Tell your manager before 9am on the first day.\n")
    folder.write("vpn.txt", "Connect to the VPN with the corporate client before opening "
                            "internal sites.\n")
    folder.write("hr/salaries.csv", "role,band\nengineer,B3\nmanager,B4\n")


@contextmanager
def _asking(collection: str) -> Iterator[list]:
    """A thread asking QUESTION through the alias every few ms; yields each answer's number of
    documents, or the error it raised."""
    settings = get_settings()
    vector = query_encoder(settings.embedding_model).encode(QUESTION)
    answers: list = []
    stop = threading.Event()

    def ask() -> None:
        with connect_index(settings) as client:
            while not stop.is_set():
                try:
                    found = retrieve(client, collection, QUESTION, vector, ["group:staff"],
                                     QueryFilters())
                    answers.append(len(found))
                except Exception as error:  # every failure is an answer to report
                    answers.append(error)
                time.sleep(0.005)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(30)


def test_a_reindex_switches_queries_to_a_new_collection_without_a_moment_of_downtime(
        folder: FolderSource) -> None:
    _corpus(folder)
    folder.sync()
    client, alias = folder.client, folder.collection
    assert alias_target(client, alias) == f"{alias}_v1"  # a fresh install starts aliased
    before = folder.index()

    with _asking(alias) as answers:
        result = reindex(reason="new chunking")
        time.sleep(0.2)  # a few questions after the switch too

    assert len(answers) > 20
    assert [a for a in answers if not isinstance(a, int) or a == 0] == []
    assert alias_target(client, alias) == f"{alias}_v2" == result["to"]
    assert sorted(index_versions(client, alias).values()) == [f"{alias}_v2"]  # old one deleted
    assert folder.index() == before
    assert result["chunks"] == {"handbook": sum(map(len, before.values()))}
    audit = folder.store.audit_entries("admin.reindex")
    assert [(a.outcome, a.details["reason"]) for a in audit] == [("switched", "new chunking")]

    # Syncs resume incrementally: nothing to re-read, nothing to embed.
    summary = folder.sync()
    assert (summary["unchanged"], summary["embedded"], summary["new"]) == (3, 0, 0)


def test_a_reindex_that_fails_midway_leaves_the_alias_and_the_state_as_they_were(
        folder: FolderSource) -> None:
    _corpus(folder)
    folder.sync()
    client, alias = folder.client, folder.collection
    before, known = folder.index(), folder.store.known_documents("handbook")
    # A second source whose connector cannot read: it is re-read after `handbook`.
    config = yaml.safe_load(folder.config.read_text())
    config["sources"].append({"name": "archive", "type": "folder",
                              "params": {"root": "no-such-folder"},
                              "principals": {"": ["group:staff"]}})
    folder.config.write_text(yaml.safe_dump(config))

    with _asking(alias) as answers:
        state = reindex(reason="model upgrade", return_state=True)
    assert state.is_failed()
    assert "no-such-folder" in str(state.result(raise_on_failure=False))

    assert answers and [a for a in answers if not isinstance(a, int) or a == 0] == []
    assert alias_target(client, alias) == f"{alias}_v1"
    assert sorted(index_versions(client, alias).values()) == [f"{alias}_v1"]  # v2 deleted
    assert folder.index() == before
    assert folder.store.known_documents("handbook") == known
    audit = folder.store.audit_entries("admin.reindex")
    assert [a.outcome for a in audit] == ["failed"]
    assert "no-such-folder" in audit[0].details["error"]
    # The locks were given back: the next sync runs, and finds nothing to do.
    assert folder.sync()["unchanged"] == 3


def test_the_first_reindex_migrates_a_collection_made_before_aliases(
        folder: FolderSource) -> None:
    from tasks.index import create_collection

    create_collection(folder.client, folder.collection)  # as installs before aliases made it
    folder.write("vpn.txt", "Connect to the VPN before opening internal sites.\n")
    folder.sync()
    assert alias_target(folder.client, folder.collection) is None
    before = folder.index()

    result = reindex(reason="adopt aliases")

    assert (result["from"], result["to"]) == (folder.collection, f"{folder.collection}_v1")
    assert alias_target(folder.client, folder.collection) == f"{folder.collection}_v1"
    assert folder.index() == before
