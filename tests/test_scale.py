"""Scale-out: a sync on Dask worker processes builds the very index the default runner builds."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import FolderSource
from distributed import Client, LocalCluster, get_task_stream

from flows.sync import sync_source, sync_task_runner
from headwater.settings import Settings, get_settings
from tasks import ingest
from tasks.index import delete_index

CORPUS = {
    "leave.md": "# Leave\n\nAnnual leave is 25 days a year.\n\n## Sick leave\n\nTell your "
                "manager before 9am on the first day.\n",
    "vpn.txt": "Connect to the VPN with the corporate client before opening internal sites.\n",
    "hr/salaries.csv": "role,band\nengineer,B3\nmanager,B4\n",
    "pumps.md": "# Pumps\n\nThe BP-200 pump moves 200 litres a minute and is serviced yearly.\n",
}


@pytest.fixture(scope="module")
def dask() -> Iterator[Client]:
    """A local Dask cluster of two worker processes, started once for these tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _index(folder: FolderSource) -> dict[str, dict]:
    """Chunk id -> text, readers and vector, as Weaviate holds them."""
    return {str(o.uuid): {"text": o.properties["text"], "principals": o.properties["principals"],
                          "vector": np.asarray(o.vector["default"])}
            for o in folder.client.collections.use(folder.collection).iterator(
                include_vector=True)}


def _folder(root: Path, collection: str, client, monkeypatch) -> FolderSource:
    root.mkdir()
    # One document per batch, so that several batches are in flight on the cluster at once.
    folder = FolderSource(root, collection, client, monkeypatch, batch_size=1)
    for rel, text in CORPUS.items():
        folder.write(rel, text)
    return folder


def test_a_sync_context_crosses_to_another_process_as_names_and_settings(
        folder: FolderSource) -> None:
    folder.write("a.txt", "Some text.\n")
    ctx = ingest.open_sync(get_settings(), "handbook", full=False)
    try:
        copy = pickle.loads(pickle.dumps(ctx))
        assert copy.travelled and not ctx.travelled
        assert (copy.source, copy.run_id, copy.lock_owner, copy.collection) == (
            ctx.source, ctx.run_id, ctx.lock_owner, ctx.collection)
        assert copy.store.url == ctx.store.url and copy.known == ctx.known
        assert copy.connector.test_connection().ok  # opened again, at its first use
    finally:
        ingest.close_sync(ctx, ingest.SyncSummary("handbook"), "completed")


def test_a_sync_on_dask_workers_indexes_exactly_what_the_thread_runner_does(
        tmp_path: Path, collection: str, weaviate_client, monkeypatch, dask: Client) -> None:
    threads = _folder(tmp_path / "threads", collection, weaviate_client, monkeypatch)
    summary = threads.sync()
    assert summary["new"] == len(CORPUS)
    expected = _index(threads)

    on_dask = _folder(tmp_path / "dask", f"{collection}Dask", weaviate_client, monkeypatch)
    runner = sync_task_runner(Settings(task_runner="dask",
                                       dask_address=dask.scheduler.address))
    try:
        with get_task_stream(dask) as stream:
            state = sync_source.with_options(task_runner=runner)("handbook", return_state=True)
        assert state.is_completed(), state
        assert state.result()["new"] == len(CORPUS)
        assert state.result()["quality"] == summary["quality"]  # findings came back
        found = _index(on_dask)
    finally:
        delete_index(weaviate_client, on_dask.collection)

    assert sorted(found) == sorted(expected)
    for chunk_id, chunk in expected.items():
        assert found[chunk_id]["text"] == chunk["text"]
        assert found[chunk_id]["principals"] == chunk["principals"]
        assert np.allclose(found[chunk_id]["vector"], chunk["vector"], atol=1e-5)

    # Embedding and writing ran in the cluster's worker processes, not in this one.
    ran = {}
    for task in stream.data:
        ran.setdefault(task["key"].rsplit("-", 1)[0], set()).add(task["worker"])
    workers = dask.run(os.getpid)
    assert {"embed_chunks", "validate_chunks", "index_chunks", "commit_batch"} <= set(ran), ran
    assert set().union(*ran.values()) <= set(workers)
    assert os.getpid() not in workers.values()
    assert on_dask.store.document_count("handbook") == len(CORPUS)
    # The workers' lines go through Headwater's formatter, as the flow's do.
    assert all(dask.run(_logs_through_headwater).values())


def _logs_through_headwater() -> bool:
    import logging

    from headwater.logs import HeadwaterLogHandler

    return any(isinstance(h, HeadwaterLogHandler) for h in logging.getLogger().handlers)
