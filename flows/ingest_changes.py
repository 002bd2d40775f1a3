"""`ingest_changes`: index the documents change notifications named, with sync's own stages."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, State
from prefect.utilities.annotations import opaque

from flows.sync import index_pages, open_sync, publish_summary, sync_task_runner
from headwater.errors import retry_transient
from headwater.settings import get_settings
from headwater.state import SourceBusy
from tasks import changes, ingest

drain_changes = task(name="drain_changes", cache_policy=NO_CACHE)(changes.drain_changes)
clear_changes = task(name="clear_changes", cache_policy=NO_CACHE, retries=2,
                     retry_delay_seconds=5, retry_condition_fn=retry_transient)(
    changes.clear_changes)


@flow(name="ingest-changes", log_prints=True, task_runner=sync_task_runner(get_settings()))
def ingest_changes(source: str) -> dict | State:
    """Index one source's pending change notifications until none is left; the source's lock
    is taken as a sync takes it, and pending rows go only once their batches are committed."""
    if not changes.any_pending(get_settings(), source):
        return Completed(message=f"no change of {source!r} is pending")
    try:
        ctx = opaque(open_sync(get_settings(), source, False, flow_run.id, listing=False))
    except SourceBusy as busy:
        return Cancelled(message=f"{busy}; its pending changes stay for the next run")
    summary = ingest.SyncSummary(source, kind="changes")
    try:
        while pending := drain_changes(ctx):
            index_pages(ctx, changes.change_pages(ctx.unwrap(), pending), summary, False)
            clear_changes(ctx, opaque(pending))
    except BaseException as error:
        publish_summary(ingest.close_sync(ctx.unwrap(), summary, "failed",
                                          f"{type(error).__name__}: {error}"))
        raise
    return publish_summary(ingest.close_sync(ctx.unwrap(), summary, "completed"))
