"""`sync_source`: keep the index exactly equal to a source, touching only what changed."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.states import Cancelled, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import opaque

from headwater.errors import retry_transient
from headwater.logs import configure_logging
from headwater.metrics import record_sync_run
from headwater.settings import Settings, get_settings
from headwater.state import SourceBusy
from tasks import ingest

if flow_run.id:
    # A deployment's run starts in Prefect's engine, not in the CLI, which sets logging up.
    configure_logging()

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


def sync_task_runner(settings: Settings) -> TaskRunner:
    """Where a sync's batches are embedded and written (HEADWATER_TASK_RUNNER): threads of the
    flow's process, or the worker processes of a Dask cluster, at HEADWATER_DASK_ADDRESS or a
    local one started for the run."""
    if settings.task_runner == "thread":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": settings.dask_workers, "threads_per_worker": 1, "processes": True,
        "dashboard_address": None})


def _on_threads() -> bool:
    context = FlowRunContext.get()
    return context is None or isinstance(context.task_runner, ThreadPoolTaskRunner)


def _bare(value: object) -> object:
    return value


# Chosen where the flow is imported: a deployment's worker reads its own environment.
@flow(name="sync-source", log_prints=True, task_runner=sync_task_runner(get_settings()))
def sync_source(source: str, full: bool = False, allow_mass_delete: bool = False) -> dict | State:
    """Sync one configured source into Weaviate; one run per source at a time."""
    try:
        ctx = opaque(open_sync(get_settings(), source, full, flow_run.id))
    except SourceBusy as busy:
        return Cancelled(message=str(busy))
    summary = ingest.SyncSummary(source)
    try:
        index_pages(ctx, ingest.list_pages(ctx.unwrap()), summary, allow_mass_delete)
    except BaseException as error:
        publish_summary(ingest.close_sync(ctx.unwrap(), summary, "failed",
                                          f"{type(error).__name__}: {error}"))
        raise
    return publish_summary(ingest.close_sync(ctx.unwrap(), summary, "completed"))


def index_pages(ctx: opaque, pages: Iterable[ingest.Batch], summary: ingest.SyncSummary,
                allow_mass_delete: bool) -> None:
    """Pages of changes through every stage into the index, deletions last (the flows that
    index changes share it: `sync_source` and `ingest_changes`)."""
    deletions, writes = ingest.HeldDeletions(), _Writes(ctx, summary)
    ahead = writes.threads and ctx.unwrap().policy is not None
    try:
        for batch in _redacted(ctx, (deletions.hold(page) for page in pages), ahead):
            for stage in (chunk_documents, *writes.embedding_here):
                batch = stage(ctx, opaque(batch)) if batch.changes else batch
            writes.submit(batch)
        writes.finish()
        check_deletions(ctx, len(deletions), allow_mass_delete)
        for batch in deletions.batches(ctx.unwrap().source.batch_size):
            writes.submit(batch)
        writes.finish()
    except BaseException:
        writes.drain()  # never release the lock under a write still in flight
        raise


# Batches in the policy's worker processes at once, beside the one being embedded: with two,
# the workers never wait while the flow's thread fetches and parses the next batch.
REDACT_AHEAD = 2


def _redacted(ctx: opaque, pages: Iterable[ingest.Batch], ahead: bool
              ) -> Iterator[ingest.Batch]:
    """Batches fetched, parsed, checked and through the compliance policy. `ahead` (threads,
    a policy): the next REDACT_AHEAD batches are prepared and redacted, in the policy's worker
    processes, while the caller chunks and embeds one; on two cores that fills the gaps
    either leaves alone."""
    redacting: deque[PrefectFuture | ingest.Batch] = deque()
    for batch in pages:
        try:
            for stage in (fetch_documents, parse_documents, validate_documents):
                batch = stage(ctx, opaque(batch)) if batch.changes else batch
        except Exception:
            while redacting:  # the batches before a failing one are still written
                yield _done(redacting.popleft())
            raise
        if not ahead:
            yield redact_pii(ctx, opaque(batch)) if batch.changes else batch
            continue
        redacting.append(redact_pii.submit(ctx, opaque(batch)) if batch.changes else batch)
        if len(redacting) > REDACT_AHEAD:
            yield _done(redacting.popleft())
    while redacting:
        yield _done(redacting.popleft())


def _done(step: PrefectFuture | ingest.Batch) -> ingest.Batch:
    return step.result() if isinstance(step, PrefectFuture) else step


class _Writes:
    """Batch N is validated, indexed and committed while batch N+1 is prepared (on Dask, also
    embedded, a batch per worker); commits stay in order, and a batch that fails validation is
    never written."""

    def __init__(self, ctx: opaque, summary: ingest.SyncSummary) -> None:
        self.ctx, self.summary, self.pending = ctx, summary, deque()
        self.threads = _on_threads()
        self.depth = 1 if self.threads else ctx.unwrap().settings.dask_workers
        # On threads the flow embeds batch N+1 while the writer writes batch N; on Dask the
        # workers embed, the costly stage, several batches at once.
        self.embedding_here = (embed_chunks,) if self.threads else ()

    def submit(self, batch: ingest.Batch) -> None:
        while len(self.pending) >= self.depth:
            self._collect()
        # To a Dask worker goes a context of the batch's own; and Prefect's annotations do not
        # survive that trip (they arrive as tuples), so values travel bare.
        ctx, wrap = (self.ctx, opaque) if self.threads else (
            self.ctx.unwrap().for_batch(batch), _bare)
        embedded = batch if self.threads or not batch.chunks else embed_chunks.submit(
            ctx, wrap(batch))
        validated = validate_chunks.submit(ctx, wrap(embedded))
        indexed = index_chunks.submit(ctx, wrap(validated))
        # A batch's cursor is committed only after every batch before it.
        self.pending.append(commit_batch.submit(ctx, wrap(indexed),
                                                wait_for=list(self.pending)[-1:] or None))

    def finish(self) -> None:
        while self.pending:
            self._collect()

    def _collect(self) -> None:
        batch = self.pending.popleft().result()
        for verdict in batch.verdicts:  # found in another process (Dask)
            self.ctx.unwrap().quality.record(verdict)
        self.summary.add(batch)

    def drain(self) -> None:
        wait(list(self.pending))
