"""The index against a real Weaviate server: writes, reads, rewrites and deletions."""

from __future__ import annotations

import socket
import threading

import pytest
from weaviate.classes.query import Filter

from headwater.errors import IndexWriteError
from headwater.records import Chunk
from tasks.index import (
    connect_index,
    count_chunks,
    delete_document_chunks,
    ensure_collection,
    upsert_chunks,
)


def _unit(i: int, dim: int = 384) -> list[float]:
    vector = [0.0] * dim
    vector[i % dim] = 1.0
    return vector


def _chunks(doc_id: str, texts: list[str]) -> list[Chunk]:
    return [
        Chunk(source="handbook", doc_id=doc_id, ordinal=i, text=t, title=f"{doc_id} title",
              principals=["group:staff"])
        for i, t in enumerate(texts)
    ]


def test_written_chunks_are_found_by_vector_and_by_keyword(weaviate_client, collection) -> None:
    ensure_collection(weaviate_client, collection)
    chunks = _chunks("leave-policy", ["Annual leave is 25 days.", "Sick leave needs a note."])
    report = upsert_chunks(weaviate_client, collection, chunks, [_unit(0), _unit(1)])
    assert report.written == 2 and not report.failed_objects

    coll = weaviate_client.collections.use(collection)
    by_vector = coll.query.near_vector(near_vector=_unit(1), limit=1)
    assert by_vector.objects[0].properties["text"] == "Sick leave needs a note."
    by_keyword = coll.query.bm25(query="annual", limit=5)
    assert [o.uuid for o in by_keyword.objects] == [chunks[0].uuid]
    assert by_keyword.objects[0].properties["principals"] == ["group:staff"]


def test_rewriting_the_same_chunks_never_duplicates(weaviate_client, collection) -> None:
    ensure_collection(weaviate_client, collection)
    chunks = _chunks("runbook", ["Restart the service.", "Check the logs."])
    for _ in range(3):
        upsert_chunks(weaviate_client, collection, chunks, [_unit(0), _unit(1)])
    assert count_chunks(weaviate_client, collection) == 2


def test_a_shrunken_document_loses_only_its_surplus_chunks(weaviate_client, collection) -> None:
    ensure_collection(weaviate_client, collection)
    upsert_chunks(weaviate_client, collection, _chunks("notes", ["a", "b", "c"]),
                  [_unit(0), _unit(1), _unit(2)])
    upsert_chunks(weaviate_client, collection, _chunks("other", ["x"]), [_unit(3)])
    deleted = delete_document_chunks(weaviate_client, collection, "handbook", "notes", keep=1)
    assert deleted == 2
    remaining = weaviate_client.collections.use(collection).query.fetch_objects(
        filters=Filter.by_property("doc_id").equal("notes"), limit=10
    )
    assert [o.properties["ordinal"] for o in remaining.objects] == [0]
    assert count_chunks(weaviate_client, collection) == 2


def test_a_deleted_document_loses_all_its_chunks(weaviate_client, collection) -> None:
    ensure_collection(weaviate_client, collection)
    upsert_chunks(weaviate_client, collection, _chunks("gone", ["a", "b"]), [_unit(0), _unit(1)])
    delete_document_chunks(weaviate_client, collection, "handbook", "gone")
    assert count_chunks(weaviate_client, collection) == 0


def test_creating_the_collection_twice_changes_nothing(weaviate_client, collection) -> None:
    ensure_collection(weaviate_client, collection)
    upsert_chunks(weaviate_client, collection, _chunks("kept", ["a"]), [_unit(0)])
    ensure_collection(weaviate_client, collection)
    assert count_chunks(weaviate_client, collection) == 1


def test_rejected_objects_are_reported_with_their_reason(weaviate_client, collection) -> None:
    ensure_collection(weaviate_client, collection)
    upsert_chunks(weaviate_client, collection, _chunks("first", ["a"]), [_unit(0)])
    # A vector of another dimension is refused by Weaviate for this collection.
    bad = _chunks("second", ["b", "c"])
    with pytest.raises(IndexWriteError) as raised:
        upsert_chunks(weaviate_client, collection, bad, [_unit(1), _unit(2, dim=8)])
    assert [f["uuid"] for f in raised.value.failed_objects] == [str(bad[1].uuid)]
    assert "rejected" in raised.value.user_message


def test_connecting_to_the_index_asks_no_host_but_weaviate(local_stack, settings,
                                                           monkeypatch) -> None:
    # Every request for another host goes to this proxy, which notes it and hangs up.
    proxy = socket.create_server(("127.0.0.1", 0))
    asked: list[bytes] = []

    def note() -> None:
        proxy.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = proxy.accept()
            except TimeoutError:
                continue
            with connection:
                asked.append(connection.recv(200))

    stop = threading.Event()
    listener = threading.Thread(target=note, daemon=True)
    listener.start()
    url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        with connect_index(settings) as client:
            assert client.is_ready()
    finally:
        stop.set()
        listener.join()
        proxy.close()
    assert asked == []
