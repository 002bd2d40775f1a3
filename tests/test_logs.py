"""Structured logs: JSON lines whose ids lead from a log line to the audit trail and back."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from conftest import FolderSource
from fastapi.testclient import TestClient

from headwater.api import create_app
from headwater.logs import OWN_PACKAGES, configure_logging, resolved_format
from headwater.settings import Settings

HEADWATER = str(Path(sys.executable).parent / "headwater")
SECRET = "test-signing-secret-of-enough-length"
QUESTION = "How many days of annual leave does Jane Doe get?"


def _json_lines(text: str) -> list[dict]:
    """Every line of a log stream as an object; a line that is not JSON fails the test."""
    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line is not JSON: {line!r}", pytrace=False)
    return found


async def _prefect_log_messages(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id])))
    return [log.message for log in logs]


def test_a_sync_logs_json_lines_naming_source_document_and_run_as_audit_and_prefect_do(
        folder: FolderSource) -> None:
    folder.write("leave.md", "# Leave\n\nEvery employee has 25 days of annual leave.\n")
    folder.write("broken.pdf", b"%PDF-1.4 this is not really a pdf")

    done = subprocess.run(
        [HEADWATER, "sync", "handbook"], capture_output=True, text=True, timeout=300,
        env={**os.environ, **folder.env, "HEADWATER_LOG_FORMAT": "json",
             "HEADWATER_LOG_LEVEL": "DEBUG"})

    assert done.returncode == 0, done.stderr[-4000:]
    lines = _json_lines(done.stderr)
    assert all({"timestamp", "level", "event", "logger"} <= set(line) for line in lines)
    assert any(line["logger"].startswith("prefect") for line in lines), "Prefect's own lines"
    (audited,) = folder.store.audit_entries("ingest.quarantine")
    run_id = audited.request_id
    about_documents = [line for line in lines if "doc_id" in line]
    assert {line["doc_id"] for line in about_documents} == {"leave.md", "broken.pdf"}
    for line in about_documents:
        assert (line["source"], line["run_id"]) == ("handbook", run_id), line
    (quarantined,) = [line for line in lines if line["event"] == "document quarantined"]
    assert quarantined["doc_id"] == "broken.pdf" and quarantined["level"] == "warning"
    assert (quarantined["stage"], quarantined["reason"]) == (
        audited.details["stage"], audited.details["reason"])
    # Prefect's lines inside the run carry Headwater's run id, and Headwater's carry Prefect's.
    (started,) = [line for line in lines if line["event"] == "sync started"]
    flow_run_id = started["flow_run_id"]
    assert any(line["logger"].startswith("prefect.task_runs") and line.get("run_id") == run_id
               for line in lines)
    assert {line["flow_run_id"] for line in lines if "run_id" in line} == {flow_run_id}
    (run,) = folder.store.audit_entries("ingest.sync")
    assert run.request_id == run_id
    # The Prefect UI shows the same line, with the same ids, on the run's page.
    (message,) = [m for m in asyncio.run(_prefect_log_messages(flow_run_id))
                  if m.startswith("document quarantined")]
    for part in ("doc_id=broken.pdf", f"run_id={run_id}", "source=handbook", "stage=parse"):
        assert part in message, message


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """This process's logging sent, as JSON, to a buffer; put back as it was afterwards."""
    for switch in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        monkeypatch.delenv(switch, raising=False)  # JSON mode sets them; undone afterwards
    loggers = [logging.getLogger(), *(
        item for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger))]
    handlers = {logger: list(logger.handlers) for logger in loggers}
    levels = {name: logging.getLogger(name).level for name in OWN_PACKAGES}
    buffer = io.StringIO()
    configure_logging("json", "INFO", buffer)
    yield buffer
    for logger in loggers:
        logger.handlers[:] = handlers[logger]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.captureWarnings(False)


def test_a_query_logs_the_request_id_that_the_response_and_the_audit_entry_carry(
        folder: FolderSource, json_logs: io.StringIO) -> None:
    folder.write("leave.md", "# Leave\n\nEvery employee has 25 days of annual leave.\n")
    folder.sync()
    settings = Settings(collection=folder.collection,
                        state_db_url=folder.env["HEADWATER_STATE_DB_URL"], jwt_secret=SECRET)
    token = jwt.encode({"sub": "alice", "groups": ["staff"], "roles": ["user"],
                        "aud": "headwater", "exp": int(time.time()) + 300}, SECRET,
                       algorithm="HS256")

    with TestClient(create_app(settings)) as api:
        response = api.post("/v1/query", json={"question": QUESTION},
                            headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    assert response.headers["x-request-id"] == request_id
    lines = _json_lines(json_logs.getvalue())
    (served,) = [line for line in lines if line["event"] == "request served"
                 and line.get("request_id") == request_id]
    assert (served["route"], served["method"], served["status"]) == ("/v1/query", "POST", 200)
    assert any(e.request_id == request_id for e in folder.store.audit_entries("query"))
    assert "Jane Doe" not in json_logs.getvalue()  # questions may name people: never logged


def test_auto_format_is_console_on_a_terminal_and_json_for_a_collector() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolved_format("auto", Terminal()) == "console"
    assert resolved_format("auto", io.StringIO()) == "json"
    assert resolved_format("console", io.StringIO()) == "console"


def test_log_settings_read_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADWATER_LOG_FORMAT", "JSON")
    monkeypatch.setenv("HEADWATER_LOG_LEVEL", "debug")
    settings = Settings()
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
