"""Flows run for real: in-process against the stack's Prefect server, and through its worker."""

from __future__ import annotations

import asyncio
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment

from flows.stack_check import stack_check
from headwater.settings import PROJECT_ROOT


async def _read_run(run_id: uuid.UUID):
    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        return run, client.api_url


def test_a_flow_run_is_recorded_by_the_prefect_server(local_stack, settings, collection) -> None:
    state = stack_check(collection, return_state=True)
    assert state.is_completed()
    assert state.result()["read_back"] is True

    run, api_url = asyncio.run(_read_run(state.state_details.flow_run_id))
    assert str(api_url).rstrip("/") == settings.prefect_api_url
    assert run.state.is_completed()
    assert run.name  # visible in the UI under a name


def test_a_deployment_runs_on_the_local_worker(local_stack, settings, collection) -> None:
    deployment_id = stack_check.from_source(
        source=str(PROJECT_ROOT), entrypoint="flows/stack_check.py:stack_check"
    ).deploy(
        name=f"test-{uuid.uuid4().hex[:8]}",
        work_pool_name=settings.work_pool,
        parameters={"collection": collection},
        print_next_steps=False,
    )
    try:
        run = run_deployment(deployment_id, timeout=180)
        assert run.state.is_completed(), run.state
    finally:
        asyncio.run(_delete_deployment(deployment_id))


async def _delete_deployment(deployment_id: uuid.UUID) -> None:
    async with get_client() as client:
        await client.delete_deployment(deployment_id)
