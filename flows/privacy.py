"""`data_subject_request` and `retention_purge`: privacy requests and retention, audited."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import SecretStr

from flows.sync import sync_source
from headwater.errors import retry_transient
from headwater.settings import get_settings
from tasks import privacy

_step = {"cache_policy": NO_CACHE}
# Reads and deletes are idempotent: a transient Weaviate or database failure is retried.
_retried = {**_step, "retries": 2, "retry_delay_seconds": 5,
            "retry_condition_fn": retry_transient}

open_request = task(name="open_request", **_step)(privacy.open_request)
close_request = task(name="close_request", **_step)(privacy.close_request)
load_identifiers = task(name="load_identifiers", **_step)(privacy.load_identifiers)
export_mentions = task(name="export_mentions", **_retried)(privacy.export_mentions)
erase_mentions = task(name="erase_mentions", **_retried)(privacy.erase_mentions)
rectify_mentions = task(name="rectify_mentions", **_retried)(privacy.rectify_mentions)
retention_sources = task(name="retention_sources", **_step)(privacy.retention_sources)
purge_expired = task(name="purge_expired", **_retried)(privacy.purge_expired)

@task(name="publish_request", cache_policy=NO_CACHE)
def publish_request(result: privacy.PrivacyResult) -> privacy.PrivacyResult:
    create_markdown_artifact(key=f"privacy-{result.kind}", markdown=privacy.request_markdown(
        result), description=f"Data-subject request {result.request_id} ({result.kind})")
    if result.per_source:
        create_table_artifact(key=f"privacy-{result.kind}-sources",
                              table=[{"source": s, **c} for s, c in result.per_source.items()],
                              description=f"Counts per source of request {result.request_id}")
    return result


@flow(name="data-subject-request", log_prints=True)
def data_subject_request(kind: str, identifiers: dict[str, SecretStr | list[SecretStr]] | None,
                         requested_by: str, scope: str = "chunks", output: str | None = None,
                         resync: bool = True, identifiers_secret: str | None = None
                         ) -> privacy.PrivacyResult:
    """Access, erasure, rectification or portability for one person, named by typed
    identifiers (SecretStr: the Prefect server stores them masked) or, for deployment runs, a
    Prefect Secret block holding them. Only keyed hashes go further than the first task."""
    settings = get_settings()
    given = identifiers or (load_identifiers(identifiers_secret) if identifiers_secret else {})
    request = open_request(settings, kind, requested_by, given, scope,
                           str(flow_run.id) if flow_run.id else None)
    try:
        if kind in ("access", "portability"):
            result = export_mentions(settings, request, output)
        elif kind == "erasure":
            result = erase_mentions(settings, request)
        else:  # open_request accepts no other kind
            result = rectify_mentions(settings, request)
            # The source holds the truth: a re-sync reads the corrected documents.
            result.resynced_sources = [s for s in result.resynced_sources if resync and
                                       sync_source(s, return_state=True).is_completed()]
    except BaseException as error:
        close_request(settings, request, None, error)
        raise
    return publish_request(close_request(settings, request, result))


@flow(name="retention-purge", log_prints=True)
def retention_purge(sources: list[str] | None = None) -> list[privacy.RetentionResult]:
    """Remove every document past its source's `retention:` from the index and the state."""
    settings = get_settings()
    results = [purge_expired(settings, source)
               for source in retention_sources(settings, sources)]
    create_markdown_artifact(key="retention-purge", markdown=privacy.retention_markdown(results),
                             description="Documents removed past their source's retention")
    return results
