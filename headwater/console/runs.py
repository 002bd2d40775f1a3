"""The console's Prefect side: sync and data-subject-request runs started through deployments."""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from headwater.deploy import SYNC_FLOW, deployment_name
from headwater.errors import HeadwaterError
from headwater.logs import get_logger
from headwater.settings import Settings

log = get_logger(__name__)

PRIVACY_FLOW = "data-subject-request"
# Tags of the runs the console starts, so its privacy page lists its own requests.
CONSOLE_TAG = "console"
SECRET_PREFIX = "privacy-request-"
# How long a request's identifiers may wait in their Secret block for its run to end.
IDENTIFIERS_TTL_S = 6 * 3600.0


class NotDeployed(HeadwaterError):
    """The deployment a console action starts is not on the Prefect server."""


@dataclass(frozen=True)
class Deployment:
    id: str
    name: str
    flow: str
    url: str


@dataclass(frozen=True)
class RunState:
    """A flow run as the console shows it: its state and where the Prefect UI has it."""

    id: str
    name: str
    state_type: str  # COMPLETED, RUNNING, FAILED...
    state_name: str
    parameters: dict[str, Any]
    tags: list[str]
    created: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    deployment_id: str | None
    url: str

    @property
    def final(self) -> bool:
        return self.state_type in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _run_state(settings: Settings, run: Any) -> RunState:
    state = run.state
    return RunState(
        id=str(run.id), name=run.name, state_type=state.type.value if state else "PENDING",
        state_name=state.name if state else "Pending", parameters=dict(run.parameters or {}),
        tags=list(run.tags or []), created=run.created, start_time=run.start_time,
        end_time=run.end_time,
        deployment_id=str(run.deployment_id) if run.deployment_id else None,
        url=f"{settings.resolved_prefect_ui_url}/runs/flow-run/{run.id}")


def _deployments(settings: Settings, flow: str) -> list[Deployment]:
    """The deployments of `flow` on the configured work pool, the one its runs land on."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        WorkPoolFilter,
        WorkPoolFilterName,
    )

    with _client() as client:
        found = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[settings.work_pool])))
    ui = settings.resolved_prefect_ui_url
    return [Deployment(str(d.id), d.name, flow, f"{ui}/deployments/deployment/{d.id}")
            for d in sorted(found, key=lambda d: d.name)]


def sync_deployments(settings: Settings) -> dict[str, Deployment]:
    """Source name -> its `sync-<source>` deployment (as `headwater deploy` names them), or
    any sync deployment of the source on the pool."""
    from headwater.config import load_sources

    deployments = _deployments(settings, SYNC_FLOW)
    found: dict[str, Deployment] = {}
    for source in load_sources(settings.config):
        named = [d for d in deployments if d.name == deployment_name(source)]
        others = [d for d in deployments if d.name.startswith(deployment_name(source) + "-")]
        if named or others:
            found[source] = (named or others)[0]
    return found


def privacy_deployment(settings: Settings) -> Deployment | None:
    deployments = _deployments(settings, PRIVACY_FLOW)
    named = [d for d in deployments if d.name == PRIVACY_FLOW]
    return (named or deployments or [None])[0]


def start_run(settings: Settings, deployment: Deployment, parameters: dict[str, Any],
              tags: list[str]) -> RunState:
    from prefect.deployments import run_deployment

    # timeout=0: create the run and return; the worker of its pool runs it.
    run = run_deployment(deployment.id, parameters=parameters, timeout=0,
                         tags=[CONSOLE_TAG, *tags], as_subflow=False)
    return _run_state(settings, run)


def start_sync(settings: Settings, source: str) -> RunState:
    deployment = sync_deployments(settings).get(source)
    if deployment is None:
        raise NotDeployed(
            f"source {source!r} has no sync deployment on work pool {settings.work_pool!r} "
            "yet: run `headwater deploy` and `prefect deploy --all` first")
    return start_run(settings, deployment, {"source": source}, [f"source:{source}"])


def flow_run(settings: Settings, run_id: str) -> RunState | None:
    import uuid

    from prefect.exceptions import ObjectNotFound

    try:
        key = uuid.UUID(run_id)
    except ValueError:
        return None
    with _client() as client:
        try:
            return _run_state(settings, client.read_flow_run(key))
        except ObjectNotFound:
            return None


def export_path(settings: Settings, request_id: str, kind: str) -> Path:
    """Where a console request's export is written: under the data dir, by a request id of
    the console's own (the flow and the API must share this folder: a process worker)."""
    suffix = "jsonl" if kind == "portability" else "json"
    return settings.data_dir / "privacy" / "console" / f"{request_id}-{kind}.{suffix}"


def start_privacy_request(settings: Settings, kind: str, identifiers: dict[str, list[str]],
                          requested_by: str, scope: str = "chunks") -> RunState:
    """A data-subject-request run whose identifiers travel in a one-off Secret block (run
    parameters are stored by the Prefect server as given); the block is deleted once the run
    has ended."""
    from prefect.blocks.system import Secret

    deployment = privacy_deployment(settings)
    if deployment is None:
        raise NotDeployed(
            f"the {PRIVACY_FLOW} deployment is not on work pool {settings.work_pool!r} yet: "
            "run `prefect deploy --all` first")
    request_id = secrets.token_hex(8)
    block = SECRET_PREFIX + request_id
    Secret(value=json.dumps(identifiers)).save(block, overwrite=False)
    parameters: dict[str, Any] = {"kind": kind, "identifiers": None,
                                  "requested_by": requested_by, "scope": scope,
                                  "identifiers_secret": block}
    if kind in ("access", "portability"):
        parameters["output"] = str(export_path(settings, request_id, kind))
    try:
        run = start_run(settings, deployment, parameters, ["privacy", f"kind:{kind}"])
    except Exception:
        forget_identifiers(block)
        raise
    threading.Thread(target=_forget_when_done, args=(settings, run.id, block),
                     name=f"forget-{block}", daemon=True).start()
    return run


def forget_identifiers(block: str) -> bool:
    """Delete a request's Secret block; False when it was already gone."""
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        try:
            document = client.read_block_document_by_name(block, block_type_slug="secret")
            client.delete_block_document(document.id)
        except ObjectNotFound:
            return False
    return True


def _forget_when_done(settings: Settings, run_id: str, block: str) -> None:
    deadline = time.monotonic() + IDENTIFIERS_TTL_S
    while time.monotonic() < deadline:
        try:
            run = flow_run(settings, run_id)
            if run is None or run.final:
                break
        except Exception as error:  # the server restarting: look again, the block can wait
            log.warning("privacy run unreadable", flow_run_id=run_id, error=repr(error))
        time.sleep(2)
    try:
        forget_identifiers(block)
    except Exception as error:  # the privacy page's sweep deletes it on its next load
        log.warning("identifiers block not deleted", block=block, error=repr(error))


def privacy_runs(settings: Settings, limit: int = 50) -> list[RunState]:
    """The data-subject-request runs the console started, newest first; the identifiers of
    those that have ended are deleted if a restart left them behind."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterTags,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    with _client() as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[PRIVACY_FLOW])),
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[CONSOLE_TAG])),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[settings.work_pool])),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)
        found = [_run_state(settings, r) for r in runs]
        ended = {r.parameters.get("identifiers_secret") for r in found if r.final}
        left = [b for b in client.read_block_documents_by_type("secret", include_secrets=False)
                if b.name in ended]
        for block in left:
            # The run's watcher may have deleted it meanwhile.
            with contextlib.suppress(ObjectNotFound):
                client.delete_block_document(block.id)
    return sorted(found, key=lambda r: r.created.timestamp() if r.created else 0.0,
                  reverse=True)
