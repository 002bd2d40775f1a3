"""Deployments: prefect.yaml generated from the sources file, deployable, and the prod assets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from conftest import (
    create_pool,
    deployed_on_own_pool,
    deployment_runs,
    deployments_on,
    flow_run,
    retire_pool,
)

from headwater.deploy import GENERATED_BEGIN, GENERATED_END, DeployError, plan, refreshed_text
from headwater.settings import PROJECT_ROOT, Settings

BIN = Path(sys.executable).parent
DEPLOYMENTS = PROJECT_ROOT / "deployments"
DEFAULT_POOL = Settings.model_fields["work_pool"].default

HAND_WRITTEN = """\
# Our deployments. This comment stays.
name: acme
prefect-version: 3.8.8

pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $PWD }}"

deployments:
  # A nightly report someone wrote by hand.
  - name: nightly-report
    entrypoint: flows/report.py:report   # not ours to touch
    work_pool: {name: reports}
    schedules:
      - cron: "0 2 * * *"
"""

SOURCES = [
    {"name": "handbook", "type": "folder", "params": {"root": "docs"},
     "schedule": {"interval_s": 900}},
    {"name": "wiki", "type": "s3", "params": {"bucket": "kb"},
     "schedule": {"cron": "*/15 6-18 * * 1-5"}},
    {"name": "crm", "type": "database", "params": {"url": "sqlite://"}},
]


def _write_sources(path: Path, sources: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"sources": sources}, sort_keys=False))
    return path


def _deployments(text: str) -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load(text)["deployments"]}


def _headwater(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "headwater"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A sources file with three sources and a prefect.yaml with only hand-written entries."""
    (tmp_path / "prefect.yaml").write_text(HAND_WRITTEN)
    return tmp_path / "prefect.yaml", _write_sources(tmp_path / "headwater.yaml", SOURCES)


# -- generation -----------------------------------------------------------------------------


def test_each_source_gets_one_sync_deployment_in_sources_file_order(project) -> None:
    prefect_file, sources = project
    written = plan(prefect_file, sources, "headwater-local").refreshed

    found = _deployments(written)
    assert list(found) == ["sync-handbook", "sync-wiki", "sync-crm", "nightly-report"]
    assert found["sync-wiki"] == {
        "name": "sync-wiki",
        "description": "Sync source wiki (s3) into Weaviate.",
        "entrypoint": "flows/sync.py:sync_source",
        "parameters": {"source": "wiki"},
        "work_pool": {"name": "headwater-local"},
        "tags": ["sync", "source:wiki", "type:s3"],
        "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"},
        "schedules": [{"cron": "*/15 6-18 * * 1-5"}],
    }
    assert found["sync-handbook"]["schedules"] == [{"interval": 900}]
    assert "schedules" not in found["sync-crm"]  # no schedule: runs only when asked


def test_hand_written_deployments_and_comments_are_kept_byte_for_byte(project) -> None:
    prefect_file, sources = project
    written = plan(prefect_file, sources, "headwater-local").refreshed

    begin, end = written.index(GENERATED_BEGIN), written.index(GENERATED_END)
    outside = written[:written.rindex("\n", 0, begin) + 1] + written[
        written.index("\n", end) + 1:]
    assert outside == HAND_WRITTEN


def test_refreshing_twice_changes_nothing(project) -> None:
    prefect_file, sources = project
    prefect_file.write_text(plan(prefect_file, sources, "headwater-local").refreshed)

    again = plan(prefect_file, sources, "headwater-local")
    assert again.up_to_date
    assert again.refreshed == prefect_file.read_text()


def test_a_removed_source_loses_its_deployment_and_a_changed_one_is_rewritten(project) -> None:
    prefect_file, sources = project
    prefect_file.write_text(plan(prefect_file, sources, "headwater-local").refreshed)
    _write_sources(sources, [{**SOURCES[0], "schedule": {"cron": "0 * * * *"}}, SOURCES[2]])

    found = plan(prefect_file, sources, "headwater-local")
    assert found.summary == "stale sync-wiki; changed sync-handbook (schedules)"
    assert list(_deployments(found.refreshed)) == ["sync-handbook", "sync-crm", "nightly-report"]
    assert _deployments(found.refreshed)["sync-handbook"]["schedules"] == [{"cron": "0 * * * *"}]


def test_a_hand_written_deployment_with_a_generated_name_is_refused(project) -> None:
    prefect_file, sources = project
    prefect_file.write_text(HAND_WRITTEN + "  - name: sync-crm\n    entrypoint: x.py:y\n")

    with pytest.raises(DeployError, match=r"\['sync-crm'\] more than once"):
        plan(prefect_file, sources, "headwater-local")


def test_a_lone_marker_is_refused_rather_than_guessed_at() -> None:
    with pytest.raises(DeployError, match="one marker"):
        refreshed_text(HAND_WRITTEN + f"  {GENERATED_BEGIN}\n", [])


def test_deploy_check_fails_in_one_line_until_deploy_refreshes_the_file(project) -> None:
    prefect_file, sources = project
    env = {"HEADWATER_CONFIG": str(sources), "HEADWATER_WORK_POOL": "k8s-embedding"}

    stale = _headwater("deploy", "--check", "--prefect-file", str(prefect_file), env=env)
    assert stale.returncode == 1
    assert stale.stderr.count("\n") == 1, stale.stderr
    assert "missing sync-handbook, sync-wiki, sync-crm" in stale.stderr
    assert prefect_file.read_text() == HAND_WRITTEN  # --check never writes

    refreshed = _headwater("deploy", "--prefect-file", str(prefect_file), env=env)
    assert refreshed.returncode == 0, refreshed.stderr
    assert _deployments(prefect_file.read_text())["sync-crm"]["work_pool"] == {
        "name": "k8s-embedding"}  # the pool comes from the setting
    assert _headwater("deploy", "--check", "--prefect-file", str(prefect_file),
                      env=env).returncode == 0


def test_the_repository_prefect_yaml_is_up_to_date_with_headwater_yaml() -> None:
    found = plan(PROJECT_ROOT / "prefect.yaml", PROJECT_ROOT / "headwater.yaml", DEFAULT_POOL)
    assert found.up_to_date, f"{found.summary}: run `headwater deploy` and commit prefect.yaml"


def test_the_readme_names_the_deployments_prefect_yaml_holds() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Prefect deployments", 1)[1].split("\n## ", 1)[0]
    for name in _deployments((PROJECT_ROOT / "prefect.yaml").read_text()):
        assert f"`{name}`" in section, f"README's Prefect deployments section omits {name}"


# -- prefect deploy --all against the local server -------------------------------------------


def test_prefect_deploy_all_registers_what_prefect_yaml_declares(local_stack, tmp_path) -> None:
    # Deployed as written, the hourly sync would run on the shared worker against the shared
    # index, and same-named deployments of other sessions would be replaced and then deleted.
    # So a copy is deployed with a suffix on each name and onto a pool of this test's own that
    # no worker polls; everything else is exactly what the repository's prefect.yaml says.
    token = uuid.uuid4().hex[:8]
    pool = f"headwater-deploy-test-{token}"
    project = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    declared = {d["name"]: d for d in project["deployments"]}
    for entry in project["deployments"]:
        entry["name"] = f"{entry['name']}-{token}"
        entry["work_pool"]["name"] = pool
    copy = tmp_path / "prefect.yaml"
    copy.write_text(yaml.safe_dump(project, sort_keys=False))

    create_pool(pool)
    try:
        result = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(copy)],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        found = {d.name.removesuffix(f"-{token}"): d for d in deployments_on(pool)}
    finally:
        retire_pool(pool)

    assert set(found) == set(declared)
    assert not deployments_on(pool), "test deployments were left on the server"
    for name, entry in declared.items():
        deployment = found[name]
        assert deployment.entrypoint == entry["entrypoint"]
        assert deployment.parameters == entry.get("parameters", {})
        assert deployment.tags == entry.get("tags", [])
        assert deployment.description == entry["description"]
        want = entry.get("concurrency_limit")
        if want is None:
            assert deployment.global_concurrency_limit is None, name
        else:
            assert deployment.global_concurrency_limit.limit == want["limit"]
            assert deployment.concurrency_options.collision_strategy.value == want[
                "collision_strategy"]
        schedules = [s.schedule for s in deployment.schedules]
        assert [{"interval": int(s.interval.total_seconds())} if hasattr(s, "interval")
                else {"cron": s.cron} for s in schedules] == entry.get("schedules", [])
    assert found["sync-demo"].schedules[0].schedule.interval == timedelta(hours=1)
    assert found["sync-demo"].global_concurrency_limit.limit == 1
    assert found["answer-query"].global_concurrency_limit is None  # many questions at once


# -- a scheduled sync, unattended --------------------------------------------------------------

EMPTY_PROJECT = """\
name: headwater-scheduled-test
prefect-version: 3.8.8
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $PWD }}"
deployments:
"""


def test_a_scheduled_sync_runs_unattended_and_indexes_the_source(
        local_stack, tmp_path: Path, weaviate_client, collection: str) -> None:
    from conftest import indexed_texts

    from headwater.state import StateStore

    token = uuid.uuid4().hex[:8]
    pool, name = f"headwater-schedule-test-{token}", f"sync-handbook-{token}"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "leave.md").write_text("# Leave\n\nEvery employee has 25 days.\n")
    sources = _write_sources(tmp_path / "headwater.yaml", [{
        "name": "handbook", "type": "folder", "params": {"root": "docs"},
        "schedule": {"interval_s": 15}, "principals": {"": ["group:staff"]}}])
    state_db = f"sqlite:///{tmp_path / 'state.db'}"
    # The deployment as `headwater deploy` generates it, on a pool and with settings of this
    # test's own (job variables are how a deployment's runs get their environment).
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(EMPTY_PROJECT)
    project = yaml.safe_load(plan(prefect_file, sources, pool).refreshed)
    (entry,) = project["deployments"]
    assert entry["schedules"] == [{"interval": 15}]
    entry["name"] = name
    entry["work_pool"]["job_variables"] = {"env": {
        "HEADWATER_CONFIG": str(sources), "HEADWATER_STATE_DB_URL": state_db,
        "HEADWATER_COLLECTION": collection, "HEADWATER_DATA_DIR": str(tmp_path / "data"),
        "HF_HUB_OFFLINE": "1"}}
    prefect_file.write_text(yaml.safe_dump(project, sort_keys=False))

    worker_log = tmp_path / "worker.log"
    with deployed_on_own_pool(prefect_file, pool, worker_log) as worker:
        # Nobody starts a run: the server's scheduler creates them (a new deployment's within
        # its 5 s "recent deployments" loop), the worker picks them up when they are due.
        deadline = time.monotonic() + 30
        while not deployment_runs(name):
            assert time.monotonic() < deadline, (
                "the Prefect server's scheduler created no run of a new deployment in 30 s; "
                f"see its log, {Settings().data_dir / 'logs/prefect-server.log'} (Prefect 3.8 "
                "cannot insert scheduled runs with SQLAlchemy 2.1: 'Can't evaluate bulk DML')")
            time.sleep(1)
        deadline = time.monotonic() + 300
        while not (done := deployment_runs(name, "COMPLETED")):
            broken = deployment_runs(name, "FAILED", "CRASHED")
            assert not broken, f"{broken[0].state}\n{worker_log.read_text()[-4000:]}"
            assert worker.poll() is None, worker_log.read_text()[-4000:]
            assert time.monotonic() < deadline, (
                "no scheduled run completed in 300 s\n" + worker_log.read_text()[-4000:])
            time.sleep(1)
        deployment_id = done[0].deployment_id

    assert all(run.auto_scheduled and run.created_by.type == "SCHEDULE" for run in done)
    assert set(indexed_texts(weaviate_client, collection)) == {"leave.md"}
    synced = StateStore(state_db).finished_run(source="handbook")
    assert synced.status == "completed"
    run = flow_run(synced.flow_run_id)
    assert (run.deployment_id, run.state.type.value) == (deployment_id, "COMPLETED")
    assert run.auto_scheduled and run.created_by.type == "SCHEDULE", run.created_by


# -- production assets -----------------------------------------------------------------------


def _assets(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in DEPLOYMENTS.glob(pattern)
                  if "demo" not in p.parts and "local" not in p.parts)


def _documents(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_every_production_asset_parses_and_is_documented() -> None:
    assets = _assets("**/*.yaml", "**/*.yml", "**/*.json")
    assert len(assets) >= 5, assets
    deploy = (PROJECT_ROOT / "docs" / "deploy.md").read_text()
    # Monitoring assets are documented beside the series they use.
    docs = deploy + (PROJECT_ROOT / "docs" / "observability.md").read_text()
    for asset in assets:
        assert _documents(asset), asset
        assert str(asset.relative_to(PROJECT_ROOT)) in docs, f"docs omit {asset}"
    assert "not exercised on a cluster" in deploy


_SECRET_NAME = re.compile(r"(secret|password|token|api_?key|private_?key)", re.I)
# Switches, user lists and references to a Secret are named like secrets but hold none.
_NOT_A_SECRET = re.compile(r"(_ENABLED|_USERS|Name|Ref)$")


def _literal_secrets(node: object, parent: str = "") -> list[str]:
    """Secret-sounding settings whose value is written out rather than referenced."""
    found: list[str] = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and _SECRET_NAME.search(name) and "value" in node:
            found.append(name)  # a Kubernetes env entry with `value:` instead of `valueFrom:`
        for key, value in node.items():
            if (parent != "envSecrets" and isinstance(value, str)
                    and _SECRET_NAME.search(str(key)) and not _NOT_A_SECRET.search(str(key))
                    and not value.startswith("${")):
                found.append(str(key))
            found += _literal_secrets(value, str(key))
    elif isinstance(node, list):
        for value in node:
            found += _literal_secrets(value, parent)
    return found


def test_no_asset_holds_a_literal_secret() -> None:
    for asset in _assets("**/*.yaml", "**/*.yml", "**/*.json"):
        for document in _documents(asset):
            assert document.get("kind") != "Secret", f"{asset} defines a Secret with data"
            assert not _literal_secrets(document), (asset, _literal_secrets(document))


def test_the_kubernetes_job_template_has_what_prefects_worker_requires() -> None:
    template = json.loads((DEPLOYMENTS / "kubernetes" / "work-pool-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    config = template["job_configuration"]
    assert {"command", "env", "labels", "name", "namespace", "job_manifest", "cluster_config",
            "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"} <= set(
        config)
    manifest = config["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "prefect-job"
    assert container["args"] == "{{ command }}"
    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= set(requests)
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["TRANSFORMERS_OFFLINE"]["value"] == "1"
    assert "secretKeyRef" in env["HEADWATER_WEAVIATE_API_KEY"]["valueFrom"]
    variables = template["variables"]
    assert variables["type"] == "object"
    used = set(re.findall(r"{{ (\w+) }}", json.dumps(config)))
    assert used <= set(variables["properties"]), used - set(variables["properties"])


def _workloads(path: Path) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _documents(path)
            if d.get("kind") in ("Deployment", "StatefulSet")}


def test_the_api_is_probed_on_readyz_and_healthz_and_configured_by_headwater_settings() -> None:
    api = _workloads(DEPLOYMENTS / "kubernetes" / "headwater-api.yaml")["headwater-api"]
    (container,) = api["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"] for e in container["env"]}
    fields = {f"HEADWATER_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("HEADWATER_")} <= fields
    kinds = {d["kind"] for d in _documents(DEPLOYMENTS / "kubernetes" / "headwater-api.yaml")}
    assert {"Deployment", "Service"} <= kinds


def test_the_prefect_server_reads_its_database_url_from_a_secret() -> None:
    manifests = _workloads(DEPLOYMENTS / "kubernetes" / "prefect-server.yaml")
    (server,) = manifests["prefect-server"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in server["env"]}
    assert "secretKeyRef" in env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]["valueFrom"]
    (worker,) = manifests["prefect-worker"]["spec"]["template"]["spec"]["containers"]
    assert worker["args"][worker["args"].index("--type") + 1] == "kubernetes"
    assert worker["args"][worker["args"].index("--pool") + 1] == "headwater-kubernetes"


def test_the_weaviate_values_make_a_replicated_authenticated_cluster_without_modules() -> None:
    values = yaml.safe_load((DEPLOYMENTS / "helm" / "weaviate-values.yaml").read_text())
    assert values["image"]["tag"] == Settings.model_fields["weaviate_version"].default
    assert values["replicas"] == 3
    assert values["env"]["REPLICATION_MINIMUM_FACTOR"] == 3
    assert values["authentication"]["anonymous_access"]["enabled"] is False
    assert values["env"]["AUTHENTICATION_APIKEY_ENABLED"] == "true"
    assert "AUTHENTICATION_APIKEY_ALLOWED_KEYS" in values["envSecrets"]
    assert values["modules"]["default_vectorizer_module"] == "none"
    assert not any(m.get("enabled") for m in values["modules"].values() if isinstance(m, dict))
    assert values["storage"]["size"]


def test_the_compose_file_runs_the_stack_with_the_settings_headwater_reads() -> None:
    compose = yaml.safe_load((DEPLOYMENTS / "compose" / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"weaviate", "postgres", "prefect-server", "prefect-worker", "headwater-api"} <= set(
        services)
    version = Settings.model_fields["weaviate_version"].default
    assert services["weaviate"]["image"] == f"cr.weaviate.io/semitechnologies/weaviate:{version}"
    fields = {f"HEADWATER_{name.upper()}" for name in Settings.model_fields}
    for name, service in services.items():
        env = service.get("environment") or {}
        unknown = {k for k in env if k.startswith("HEADWATER_")} - fields
        assert not unknown, (name, unknown)
    api = services["headwater-api"]["environment"]
    assert api["HEADWATER_WEAVIATE_HOST"] == "weaviate"
    assert api["HEADWATER_API_HOST"] == "0.0.0.0"
