"""A smoke-test flow: proves a Prefect run reaches the index and reads back what it wrote."""

from __future__ import annotations

from prefect import flow, task

from headwater.errors import retry_transient
from headwater.settings import get_settings
from tasks.index import connect_index, probe_index


@task(name="probe_index", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def probe_index_task(collection: str) -> dict[str, object]:
    with connect_index(get_settings()) as client:
        return probe_index(client, collection)


@flow(name="stack-check", log_prints=True)
def stack_check(collection: str | None = None) -> dict[str, object]:
    """Write, read back and delete one probe object in Weaviate."""
    return probe_index_task(collection or f"{get_settings().collection}Probe")
