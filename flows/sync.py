"""`sync_source`: keep the index exactly equal to a source, touching only what changed."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.utilities.annotations import opaque

from headwater.errors import retry_transient
from headwater.metrics import record_sync_run
from headwater.settings import get_settings
from headwater.state import SourceBusy
from tasks import ingest

# Stages run in the flow's process, on batches; only transient failures are retried.
_stage = {"cache_policy": NO_CACHE, "retries": 2, "retry_delay_seconds": 5,
          "retry_condition_fn": retry_transient}

open_sync = task(name="open_sync", **_stage)(ingest.open_sync)
fetch_documents = task(name="fetch_documents", **_stage)(ingest.fetch_documents)
parse_documents = task(name="parse_documents", cache_policy=NO_CACHE)(ingest.parse_documents)
redact_pii = task(name="redact_pii", cache_policy=NO_CACHE)(ingest.redact_pii)
chunk_documents = task(name="chunk_documents", cache_policy=NO_CACHE)(ingest.chunk_documents)
embed_chunks = task(name="embed_chunks", cache_policy=NO_CACHE)(ingest.embed_chunks)
index_chunks = task(name="index_chunks", **_stage)(ingest.index_chunks)
commit_batch = task(name="commit_batch", **_stage)(ingest.commit_batch)
validate_documents = task(name="validate_documents", cache_policy=NO_CACHE)(
    ingest.validate_documents)
validate_chunks = task(name="validate_chunks", cache_policy=NO_CACHE)(ingest.validate_chunks)
check_deletions = task(name="check_deletions", cache_policy=NO_CACHE)(ingest.check_deletions)


def _key(prefix: str, source: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes; source names also allow "_".
    return f"{prefix}-{source.replace('_', '-')}"


@task(name="publish_summary", cache_policy=NO_CACHE)
def publish_summary(summary: dict) -> dict:
    record_sync_run(get_settings(), summary)
    create_markdown_artifact(key=_key("sync", summary["source"]), markdown=ingest.summary_markdown(
        summary), description=f"Sync of {summary['source']}")
    if summary["quality"]:
        create_table_artifact(key=_key("quality", summary["source"]), table=summary["quality"],
                              description=f"Expectations checked by the sync of "
                                          f"{summary['source']} ({summary['status']}); data "
                                          f"docs: {summary['data_docs']}")
    return summary


@flow(name="sync-source", log_prints=True)
def sync_source(source: str, full: bool = False, allow_mass_delete: bool = False) -> dict | State:
    """Sync one configured source into Weaviate; one run per source at a time."""
    try:
        ctx = opaque(open_sync(get_settings(), source, full, flow_run.id))
    except SourceBusy as busy:
        return Cancelled(message=str(busy))
    summary, deletions = ingest.SyncSummary(source), ingest.HeldDeletions()
    writes = _Writes(ctx, summary)
    try:
        for batch in ingest.list_pages(ctx.unwrap()):
            batch = deletions.hold(batch)
            for stage in (fetch_documents, parse_documents, validate_documents, redact_pii,
                          chunk_documents, embed_chunks):
                batch = stage(ctx, opaque(batch)) if batch.changes else batch
            writes.submit(batch)
        writes.finish()
        check_deletions(ctx, len(deletions), allow_mass_delete)
        for batch in deletions.batches(ctx.unwrap().source.batch_size):
            writes.submit(batch)
        writes.finish()
    except BaseException as error:
        writes.drain()  # never release the lock under a write still in flight
        publish_summary(ingest.close_sync(ctx.unwrap(), summary, "failed",
                                          f"{type(error).__name__}: {error}"))
        raise
    return publish_summary(ingest.close_sync(ctx.unwrap(), summary, "completed"))


class _Writes:
    """Batch N is validated, indexed and committed while batch N+1 is prepared; commits stay
    in order, and a batch that fails validation is never written."""

    def __init__(self, ctx: opaque, summary: ingest.SyncSummary) -> None:
        self.ctx, self.summary, self.pending = ctx, summary, None

    def submit(self, batch: ingest.Batch) -> None:
        self.finish()
        validated = validate_chunks.submit(self.ctx, opaque(batch))
        indexed = index_chunks.submit(self.ctx, opaque(validated))
        self.pending = commit_batch.submit(self.ctx, opaque(indexed))

    def finish(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.summary.add(pending.result())

    def drain(self) -> None:
        if self.pending is not None:
            wait([self.pending])
