"""`reindex`: rebuild the whole index beside the one in use, then switch queries to it at once."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque

from flows.sync import index_pages, publish_summary, sync_task_runner
from headwater.errors import retry_transient
from headwater.settings import get_settings
from tasks import ingest
from tasks import reindex as steps

_step = {"cache_policy": NO_CACHE}
begin_reindex = task(name="begin_reindex", **_step)(steps.begin_reindex)
open_pass = task(name="open_pass", retries=2, retry_delay_seconds=5,
                 retry_condition_fn=retry_transient, **_step)(steps.open_pass)
check_source = task(name="check_source", **_step)(steps.check_source)
switch_index = task(name="switch_index", **_step)(steps.switch_index)
finish_reindex = task(name="finish_reindex", **_step)(steps.finish_reindex)
abandon_reindex = task(name="abandon_reindex", **_step)(steps.abandon_reindex)


@flow(name="reindex-source", log_prints=True, task_runner=sync_task_runner(get_settings()))
def reindex_source(source: str, collection: str, lock_owner: str) -> dict:
    """One source read in full into the new collection, under the reindex's lock."""
    ctx = opaque(open_pass(get_settings(), source, collection, lock_owner, flow_run.id))
    summary = ingest.SyncSummary(source)
    try:
        index_pages(ctx, ingest.list_pages(ctx.unwrap()), summary, allow_mass_delete=False)
    except BaseException as error:
        publish_summary(ingest.close_sync(ctx.unwrap(), summary, "failed",
                                          f"{type(error).__name__}: {error}"))
        raise
    return publish_summary(ingest.close_sync(ctx.unwrap(), summary, "completed"))


@flow(name="reindex", log_prints=True)
def reindex(reason: str = "", keep_old: bool = False, actor: str = steps.REINDEX_ACTOR) -> dict:
    """Re-read every source into a new versioned collection, check it against the state store,
    then switch the alias to it; on any failure the alias stays where it was."""
    settings = get_settings()
    plan = opaque(begin_reindex(settings, reason, actor, flow_run.id))
    try:
        for source in plan.unwrap().sources:
            summary = reindex_source(source, plan.unwrap().target, plan.unwrap().locks[source])
            check_source(settings, plan, source, summary)
        switch_index(settings, plan)
    except BaseException as error:
        abandon_reindex(settings, plan, reason, actor, f"{type(error).__name__}: {error}",
                        flow_run.id)
        raise
    return finish_reindex(settings, plan, reason, actor, keep_old, flow_run.id)
