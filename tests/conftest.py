"""Shared fixtures: one real local stack per test session, an isolated collection per test."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text
from weaviate.classes.query import MetadataQuery

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from headwater import stack
from headwater.errors import HeadwaterError
from headwater.settings import PROJECT_ROOT, Settings, get_settings
from headwater.state import StateStore

# Flows run in this process must talk to the stack's Prefect server, not an ephemeral one.
os.environ["PREFECT_API_URL"] = get_settings().prefect_api_url
BIN = Path(sys.executable).parent


def free_port(span: int = 1) -> int:
    """A loopback port that is free, together with the `span - 1` ports after it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if all(_is_free(port + i) for i in range(1, span)):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def isolated_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for a second, private stack: its own data dir and free loopback ports."""
    ports = {
        name: free_port()
        for name in (
            "weaviate_http_port", "weaviate_grpc_port", "weaviate_gossip_port",
            "weaviate_data_port", "prefect_port",
        )
    }
    ports["weaviate_raft_port"] = free_port(span=2)
    return Settings(data_dir=data_dir, **{**ports, **overrides})


def indexed_texts(client, collection: str) -> dict[str, list[str]]:
    """doc id -> chunk texts in ordinal order, as Weaviate holds them."""
    found: dict[str, list[tuple[int, str]]] = {}
    for obj in client.collections.use(collection).iterator():
        p = obj.properties
        found.setdefault(p["doc_id"], []).append((p["ordinal"], p["text"]))
    return {doc: [t for _, t in sorted(chunks)] for doc, chunks in found.items()}


def stack_failure(error: HeadwaterError) -> str:
    return f"{error.user_message}\n--- log tail ---\n{error.log_message}"


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def local_stack(settings: Settings) -> Iterator[list[stack.ComponentStatus]]:
    """The real stack, started once for the session or reused if already running."""
    try:
        statuses = stack.up(settings)
    except HeadwaterError as error:
        pytest.fail(f"The local stack could not start: {stack_failure(error)}", pytrace=False)
    started = {s.name for s in statuses if s.started}
    yield statuses
    if started:
        # Send Prefect's queued logs and events while its server is still up: left for exit,
        # they retry against the stopped server for minutes before the process can end.
        from prefect._internal.concurrency.services import QueueService

        QueueService.drain_all(timeout=30)
        stack.down(settings, only=started)


@pytest.fixture
def weaviate_client(local_stack: list[stack.ComponentStatus], settings: Settings) -> Iterator:
    from tasks.index import connect_index

    weaviate = stack.components(settings)[0]
    if not weaviate.healthy():
        pytest.fail(
            f"Weaviate at {settings.weaviate_url} is not answering.\n"
            f"--- {weaviate.log_file} ---\n{stack.log_tail(weaviate.log_file)}",
            pytrace=False,
        )
    with connect_index(settings) as client:
        yield client


@pytest.fixture
def collection(weaviate_client, request: pytest.FixtureRequest) -> Iterator[str]:
    """A collection (an alias and its versioned collections) of this test's own, removed
    afterwards."""
    from tasks.index import delete_index

    stem = re.sub(r"[^A-Za-z0-9]", "", request.node.name.title())[:40]
    name = f"Test{stem}{uuid.uuid4().hex[:8]}"
    yield name
    delete_index(weaviate_client, name)


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: run deployments/local/install.sh "
                    "(it installs Debian's postgresql package)", pytrace=False)
    return found[-1].parent


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server of this test session's own, on a free loopback port."""
    import pwd
    import shutil
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    data = Path(tempfile.mkdtemp(prefix="headwater-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root; Debian's package provides the postgres user.
        account = pwd.getpwnam("postgres")
        os.chown(data, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*argv: str) -> None:
        result = subprocess.run([*as_user, *argv], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = (data / "server.log").read_text() if (data / "server.log").exists() else ""
            pytest.fail(f"PostgreSQL: {' '.join(argv)} failed:\n{result.stderr}\n{log}",
                        pytrace=False)

    run(str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres",
        "--no-sync")
    run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"), "-w",
        "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


class FolderSource:
    """A folder, its sources file, a state DB and a collection, all of one test's own."""

    def __init__(self, root: Path, collection: str, client, monkeypatch: pytest.MonkeyPatch,
                 batch_size: int = 32, state_db_url: str | None = None,
                 principals: dict[str, list[str]] | None = None) -> None:
        self.docs = root / "docs"
        self.docs.mkdir()
        self.collection = collection
        self.client = client
        self.config = root / "headwater.yaml"
        self.config.write_text(yaml.safe_dump({"sources": [{
            "name": "handbook", "type": "folder", "batch_size": batch_size,
            "max_bytes": 10_000_000, "params": {"root": "docs"},
            "principals": principals or {"": ["group:staff"], "hr/": ["group:hr"]},
        }]}))
        self.env = {
            "HEADWATER_CONFIG": str(self.config),
            "HEADWATER_STATE_DB_URL": state_db_url or f"sqlite:///{root / 'state.db'}",
            "HEADWATER_COLLECTION": collection,
        }
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        self.store = StateStore(self.env["HEADWATER_STATE_DB_URL"])

    def write(self, rel: str, content: str | bytes) -> Path:
        path = self.docs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(content)
        return path

    def sync(self, full: bool = False) -> dict:
        from flows.sync import sync_source

        state = sync_source("handbook", full, return_state=True)
        assert state.is_completed(), state
        return state.result()

    def index(self) -> dict[str, list[str]]:
        return indexed_texts(self.client, self.collection)

    def update_times(self) -> dict[str, object]:
        result = self.client.collections.use(self.collection).query.fetch_objects(
            limit=1000, return_metadata=MetadataQuery(last_update_time=True))
        return {str(o.uuid): o.metadata.last_update_time for o in result.objects}


@contextmanager
def synced_corpus(root: Path, prefix: str, files: dict[str, str],
                  principals: dict[str, list[str]] | None = None,
                  **settings: object) -> Iterator[FolderSource]:
    """A folder of `files` synced once into a fresh collection named `prefix` + a random
    suffix (dropped afterwards), for a module's tests to share; `source.settings` are the
    Settings of an API over it (`settings` added)."""
    from tasks.index import connect_index, delete_index

    collection = f"{prefix}{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch, connect_index(get_settings()) as client:
        source = FolderSource(root, collection, client, patch, principals=principals)
        for rel, text in files.items():
            source.write(rel, text)
        summary = source.sync()
        assert summary["new"] == len(files), summary
        source.settings = Settings(collection=collection, state_db_url=source.env[
            "HEADWATER_STATE_DB_URL"], **settings)
        try:
            yield source
        finally:
            get_settings.cache_clear()
            delete_index(client, collection)


def bearer(secret: str, sub: str, groups: list[str], roles: list[str] | None = None,
           **claims: object) -> str:
    """An HS256 token for the API as an identity provider would issue it (5 minutes)."""
    import jwt

    return jwt.encode({"sub": sub, "groups": groups, "roles": roles or ["user"],
                       "aud": "headwater", "exp": int(time.time()) + 300, **claims},
                      secret, algorithm="HS256")


@pytest.fixture
def folder(tmp_path, collection, weaviate_client, monkeypatch) -> Iterator[FolderSource]:
    """A folder source of this test's own, indexed into this test's collection."""
    source = FolderSource(tmp_path, collection, weaviate_client, monkeypatch)
    yield source
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 in server mode on loopback, reached by the real boto3 client over HTTP."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    """A state store of this test's own, on SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        return StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    # Each test gets a database of its own on the session's PostgreSQL server.
    server = request.getfixturevalue("postgres_url")
    name = f"test_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return StateStore(server.rsplit("/", 1)[0] + f"/{name}")


# -- deployments of a test's own, on the real Prefect server -----------------------------------


async def _prefect(call: str, *args: object, **kwargs: object) -> object:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await getattr(client, call)(*args, **kwargs)


def deployments_on(pool: str) -> list:
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    return asyncio.run(_prefect("read_deployments", work_pool_filter=WorkPoolFilter(
        name=WorkPoolFilterName(any_=[pool]))))


def flow_run(run_id: object) -> object:
    return asyncio.run(_prefect("read_flow_run", run_id))


def deployment_runs(name: str, *states: str) -> list:
    """The flow runs of the deployment(s) named `name`, in the given state types if any."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    wanted = FlowRunFilter(state=FlowRunFilterState(
        type=FlowRunFilterStateType(any_=list(states)))) if states else None
    return asyncio.run(_prefect("read_flow_runs", flow_run_filter=wanted,
                                deployment_filter=DeploymentFilter(
                                    name=DeploymentFilterName(any_=[name]))))


async def _retire(pool: str, grace_s: float) -> None:
    """Pause the pool's deployments, cancel their running runs and give them `grace_s` to end,
    then delete deployments, their triggers' automations and the pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.states import Cancelling

    async with get_client() as client:
        deployments = await client.read_deployments(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
        for deployment in deployments:
            await client.pause_deployment(deployment.id)  # its scheduled runs go with it
        ids = [d.id for d in deployments]
        going = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=["PENDING", "RUNNING"])))) if ids else []
        for run in going:
            await client.set_flow_run_state(run.id, Cancelling(), force=True)
        deadline = time.monotonic() + grace_s
        while going and time.monotonic() < deadline:
            if all((await client.read_flow_run(r.id)).state.is_final() for r in going):
                break
            await asyncio.sleep(1)
        for deployment in deployments:
            # Deleting a deployment leaves its triggers' automations behind (Prefect 3.8).
            await client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
            await client.delete_deployment(deployment.id)
        await client.delete_work_pool(pool)


def create_pool(pool: str) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate

    asyncio.run(_prefect("create_work_pool", WorkPoolCreate(name=pool, type="process")))


def retire_pool(pool: str, grace_s: float = 0.0) -> None:
    asyncio.run(_retire(pool, grace_s))


@contextmanager
def deployed_on_own_pool(prefect_file: Path, pool: str, worker_log: Path | None = None,
                         grace_s: float = 60.0) -> Iterator[subprocess.Popen]:
    """Deploy `prefect_file` (its deployments naming `pool`) to the real Prefect server with a
    process worker of the test's own polling that pool, so no other test's runs land there and
    the shared worker never runs this test's; on exit everything goes, the worker's flow-run
    processes included (after `grace_s` for runs cancelled mid-way)."""
    create_pool(pool)
    worker = None
    log = worker_log.open("wb") if worker_log else subprocess.DEVNULL
    try:
        deployed = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
             str(prefect_file)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
            stdin=subprocess.DEVNULL)
        assert deployed.returncode == 0, deployed.stdout[-4000:] + deployed.stderr[-4000:]
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
             "--name", f"{pool}-worker"], cwd=PROJECT_ROOT, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2"},
            start_new_session=True)  # its flow-run processes are stopped with it
        yield worker
    finally:
        retire_pool(pool, grace_s if worker and worker.poll() is None else 0)
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)
        if worker_log:
            log.close()
