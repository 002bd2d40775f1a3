"""Observability: one scrape for flows and API, deep health checks, alert assets, the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
import yaml
from conftest import FolderSource, free_port
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from typer.testing import CliRunner

from headwater.api import create_app
from headwater.cli import app as cli
from headwater.metrics import record_sync_run, sync_metrics_file
from headwater.settings import Settings, get_settings
from headwater.state import SourceRow, StateStore, SyncRunRow, utcnow

ROOT = Path(__file__).resolve().parent.parent
HEADWATER = str(Path(sys.executable).parent / "headwater")
SECRET = "test-signing-secret-of-enough-length"
HOUR = 3600


def _token(sub: str, groups: list[str]) -> str:
    return jwt.encode({"sub": sub, "groups": groups, "roles": ["user"], "aud": "headwater",
                       "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


def _scheduled(folder: FolderSource, data_dir: Path, monkeypatch: pytest.MonkeyPatch,
               interval_s: int = HOUR) -> None:
    """Give the folder's source a schedule and the test a data dir of its own."""
    config = yaml.safe_load(folder.config.read_text())
    config["sources"][0]["schedule"] = {"interval_s": interval_s}
    folder.config.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HEADWATER_DATA_DIR", str(data_dir))
    get_settings.cache_clear()


def _samples(exposition: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def _declared(exposition: str) -> set[str]:
    """Series names a family declares, samples or not (a counter no run has raised yet)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {family.name + suffix for family in text_string_to_metric_families(exposition)
            for suffix in suffixes.get(family.type, [""])}


def _value(samples: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not served; served: " + ", ".join(
        sorted({n for n, _ in samples if n.startswith(name.rsplit("_", 1)[0])}))
    return samples[key]


def _promql_metric_names() -> dict[str, set[str]]:
    """Every headwater_* name in the alert rules and the dashboard, by the file it is in."""
    names = re.compile(r"\bheadwater_[a-z0-9_]+")
    rules = yaml.safe_load((ROOT / "deployments/prometheus/alerts.yml").read_text())
    exprs = {"alerts.yml": [r["expr"] for g in rules["groups"] for r in g["rules"]]}
    dashboard = json.loads((ROOT / "deployments/grafana/headwater-dashboard.json").read_text())
    exprs["headwater-dashboard.json"] = [t["expr"] for p in dashboard["panels"]
                                         for t in p["targets"]]
    return {file: {n for e in found for n in names.findall(e)} for file, found in exprs.items()}


def test_one_scrape_serves_the_sync_and_the_api_series_that_the_alerts_name(
    folder: FolderSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.index import count_chunks

    _scheduled(folder, tmp_path / "data", monkeypatch)
    folder.write("leave.md", "# Annual leave\n\nEvery employee has 25 days of annual leave.\n")
    folder.write("hr/bands.md", "# Salary bands\n\nBand B3 earns 61,000 to 75,000 euros.\n")
    folder.write("vpn.md", "# VPN\n\nUse the corporate client to reach the intranet.\n")
    summary = folder.sync()
    assert summary["new"] == 3, summary
    assert sync_metrics_file(get_settings(), "handbook").exists()

    settings = Settings(collection=folder.collection, jwt_secret=SECRET,
                        state_db_url=folder.env["HEADWATER_STATE_DB_URL"])
    with TestClient(create_app(settings)) as api:
        for who, groups in (("alice", ["staff"]), ("mallory", [])):
            answer = api.post("/v1/query", json={"question": "How many days of annual leave?"},
                              headers={"Authorization": f"Bearer {_token(who, groups)}"})
            assert answer.status_code == 200, answer.text
        invalid = api.post("/v1/query", json={"question": ""},
                           headers={"Authorization": f"Bearer {_token('alice', ['staff'])}"})
        assert invalid.status_code == 422
        scraped = api.get("/metrics")
    assert scraped.status_code == 200
    samples = _samples(scraped.text)
    src = {"source": "handbook"}

    for outcome in ("new", "changed", "deleted", "unchanged", "permissions", "quarantined"):
        assert _value(samples, "headwater_sync_documents", **src, outcome=outcome) == summary[
            outcome]
    assert _value(samples, "headwater_sync_documents", **src, outcome="seen") == 3
    assert _value(samples, "headwater_sync_documents", **src, outcome="indexed") == 3
    assert _value(samples, "headwater_sync_chunks_written", **src) == summary["chunks_written"]
    assert _value(samples, "headwater_sync_texts_embedded", **src) == summary["embedded"]
    assert _value(samples, "headwater_sync_stage_duration_seconds", **src, stage="embed") > 0
    assert _value(samples, "headwater_sync_embedding_cache_hit_ratio", **src) == pytest.approx(
        1 - summary["embedded"] / summary["chunks_written"])
    assert _value(samples, "headwater_sync_last_run_status", **src, status="completed") == 1
    assert _value(samples, "headwater_sync_runs_total", **src, status="completed") == 1
    assert time.time() - _value(samples, "headwater_sync_last_success_time_seconds", **src) < 300
    assert 0 <= _value(samples, "headwater_sync_lag_seconds", **src) < 300
    assert _value(samples, "headwater_source_schedule_interval_seconds", **src) == HOUR
    assert _value(samples, "headwater_quarantine_documents", **src) == 0
    assert _value(samples, "headwater_index_objects", collection=folder.collection) == (
        count_chunks(folder.client, folder.collection)) > 0

    assert _value(samples, "headwater_questions_total") == 2
    assert _value(samples, "headwater_answered_questions_total") == 1
    assert _value(samples, "headwater_empty_results_total") == 1
    assert _value(samples, "headwater_answer_rate_ratio") == 0.5
    assert _value(samples, "headwater_answer_citations_count") == 2
    assert _value(samples, "headwater_answer_citations_bucket", le="0.0") == 1
    assert _value(samples, "headwater_http_requests_total", route="/v1/query", method="POST",
                  status="200") == 2
    assert all(_value(samples, "headwater_metrics_part_up", part=part) == 1
               for part in ("sync_files", "state_db", "sources", "index"))

    assert _value(samples, "headwater_errors_total", type="RequestValidationError") == 1
    # No run failed, so the sync error counter is declared with no series yet.
    served = {name for name, _ in samples} | _declared(scraped.text)
    assert "headwater_sync_errors_total" in served
    for file, names in _promql_metric_names().items():
        assert names and names <= served, f"{file} names unserved series: {names - served}"


def test_counters_accumulate_across_runs_and_a_failure_keeps_the_last_success(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    done = {"source": "wiki", "status": "completed", "new": 2, "changed": 0, "deleted": 0,
            "unchanged": 0, "permissions": 0, "quarantined": 0, "chunks_written": 4,
            "embedded": 1, "seconds": {"embed": 0.5}, "message": ""}
    record_sync_run(settings, done, ended_at=1000.0)
    record_sync_run(settings, done, ended_at=2000.0)
    failed = {**done, "status": "failed", "message": "QualityGateFailed: 5 of 5 failed"}
    path = record_sync_run(settings, failed, ended_at=3000.0)

    samples = _samples(path.read_text())
    wiki = {"source": "wiki"}
    assert _value(samples, "headwater_sync_runs_total", **wiki, status="completed") == 2
    assert _value(samples, "headwater_sync_runs_total", **wiki, status="failed") == 1
    assert _value(samples, "headwater_sync_errors_total", **wiki, type="QualityGateFailed") == 1
    assert _value(samples, "headwater_sync_last_success_time_seconds", **wiki) == 2000.0
    assert _value(samples, "headwater_sync_last_run_end_time_seconds", **wiki) == 3000.0
    assert _value(samples, "headwater_sync_last_run_status", **wiki, status="failed") == 1
    assert _value(samples, "headwater_sync_embedding_cache_hit_ratio", **wiki) == 0.75
    assert not list(path.parent.glob(".sync-*")), "a temporary file was left behind"
    # A run over notified changes only is not a sync of the whole source: lag stays.
    path = record_sync_run(settings, {**done, "kind": "changes"}, ended_at=4000.0)
    samples = _samples(path.read_text())
    assert _value(samples, "headwater_sync_last_success_time_seconds", **wiki) == 2000.0
    assert _value(samples, "headwater_sync_runs_total", **wiki, status="completed") == 3


def test_status_deep_passes_on_the_running_stack_and_fails_naming_an_overdue_source(
    folder: FolderSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scheduled(folder, tmp_path / "data", monkeypatch)
    folder.write("leave.md", "# Annual leave\n\nEvery employee has 25 days of annual leave.\n")
    folder.sync()

    # A real process, as a Kubernetes probe runs it: the exit status is the verdict.
    healthy = subprocess.run([HEADWATER, "status", "--deep"], capture_output=True, text=True,
                             timeout=300)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    lines = {line.split()[0]: line for line in healthy.stdout.splitlines()}
    assert set(lines) == {"weaviate", "state_db", "embedding_model", "prefect_api", "disk",
                          "source:handbook"}, healthy.stdout
    assert all(" OK " in line for line in lines.values()), healthy.stdout

    with folder.store.session() as s:
        s.execute(update(SourceRow).where(SourceRow.name == "handbook")
                  .values(last_success_at=utcnow() - timedelta(seconds=3 * HOUR + 60)))
    overdue = CliRunner().invoke(cli, ["status", "--deep"])
    assert overdue.exit_code == 1, overdue.output
    failing = [line for line in overdue.output.splitlines() if " FAIL " in line]
    assert len(failing) == 1 and failing[0].startswith("source:handbook"), overdue.output
    assert "overdue" in failing[0]


def test_status_deep_fails_naming_weaviate_when_nothing_listens_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_stack
) -> None:
    config = tmp_path / "headwater.yaml"
    config.write_text(yaml.safe_dump({"sources": [{"name": "notes", "type": "folder",
                                                   "params": {"root": "."}}]}))
    state_db = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(state_db)  # migrated to head, so only Weaviate is wrong
    for key, value in {"HEADWATER_CONFIG": str(config), "HEADWATER_STATE_DB_URL": state_db,
                       "HEADWATER_DATA_DIR": str(tmp_path),
                       "HEADWATER_WEAVIATE_HTTP_PORT": str(free_port()),
                       "HEADWATER_WEAVIATE_GRPC_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["status", "--deep", "--timeout", "30"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    failing = [line.split()[0] for line in result.output.splitlines() if " FAIL " in line]
    assert failing == ["weaviate"], result.output
    assert "source:notes" in result.output and "manual" in result.output


def test_report_prints_volume_latency_failures_and_recommendations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_db = f"sqlite:///{tmp_path / 'state.db'}"
    store = StateStore(state_db)
    now = utcnow()
    with store.session() as s:
        for n in range(10):
            failed = n < 3
            s.add(SyncRunRow(
                id=f"run-{n}", source="wiki", started_at=now - timedelta(hours=2),
                finished_at=now - timedelta(hours=1), status="failed" if failed else "completed",
                summary={"seconds": {"list": 0.5, "fetch": 1.0, "embed": 8.0, "index": 0.5},
                         "quarantined": 1 if n == 9 else 0,
                         "message": "SourceError: the bucket is gone" if failed else "",
                         "quality": [{"expectation": "text_not_empty", "result": "FAIL"}]
                         if n == 9 else []}))
        # Older than the window: never counted.
        s.add(SyncRunRow(id="old", source="wiki", started_at=now - timedelta(days=3),
                         finished_at=now - timedelta(days=3), status="failed",
                         summary={"seconds": {"fetch": 500.0}, "message": "Old: gone"}))
    for n, ms in enumerate([100, 200, 300, 400, 500, 600, 700, 800, 900, 2100]):
        store.append_audit("user:alice", "query", "api" if n % 2 else "cli",
                           "no_results" if n < 2 else "answered", f"req-{n}",
                           {"answered_by": "extractive", "processing_time_ms": ms})
    monkeypatch.setenv("HEADWATER_STATE_DB_URL", state_db)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli, ["report", "--window", "24h"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    out = result.output
    assert "questions: 10 (api 5, cli 5)" in out
    assert "answered with sources: 8 (80%); found nothing: 2" in out
    assert "latency: p50 500 ms, p95 2100 ms, p99 2100 ms (over 10 timed questions)" in out
    assert "wiki: 10 runs, 3 failed (SourceError x3)" in out
    assert "embed 80.0 s (80%)" in out
    assert "documents quarantined: 1" in out and "text_not_empty x1" in out
    assert "embedding is 80% of sync time: enable batching/quantization" in out
    assert "3 of 10 runs of 'wiki' failed" in out
    assert "p95 latency 2.1 s over 1.5 s" in out
    assert "Old" not in out and "500.0" not in out


def test_the_failed_sync_automation_is_one_prefect_accepts() -> None:
    from prefect.events.schemas.automations import AutomationCore

    definition = yaml.safe_load(
        (ROOT / "deployments/prometheus/prefect-automation-failed-sync.yaml").read_text())
    automation = AutomationCore.model_validate(definition)
    assert automation.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    assert automation.actions[0].type == "send-notification"
