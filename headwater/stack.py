"""The local stack: build, start, check and stop Weaviate, the Prefect server and a worker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from headwater.errors import StackError
from headwater.settings import PROJECT_ROOT, Settings

WEAVIATE_MODULE = "github.com/weaviate/weaviate/cmd/weaviate-server"
PROMTOOL_MODULE = "github.com/prometheus/prometheus/cmd/promtool"
PROMTOOL_VERSION = "0.316.0"
WORKER_NAME = "headwater-local-worker"


@dataclass
class ComponentStatus:
    """What `headwater status` reports for one component."""

    name: str
    address: str
    log: Path
    pid: int | None = None
    running: bool = False
    healthy: bool = False
    version: str | None = None
    started: bool = False
    detail: str = ""


@dataclass
class Component:
    """One server of the stack: how to start it, where it logs, how to tell it is ready."""

    name: str
    address: str
    argv: Callable[[], list[str]]
    env: dict[str, str]
    healthy: Callable[[], bool]
    version: Callable[[], str | None]
    run_dir: Path
    log_dir: Path
    needs_port: int | None = None
    after_start: Callable[[], None] | None = field(default=None)

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.log_dir / f"{self.name}.log"


# -- process records -------------------------------------------------------------------------


def _process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of a process, so a recycled PID is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _recorded_pid(component: Component) -> int | None:
    try:
        record = json.loads(component.pid_file.read_text())
    except (OSError, ValueError):
        return None
    pid = int(record["pid"])
    if _process_start_ticks(pid) != record.get("start_ticks"):
        component.pid_file.unlink(missing_ok=True)
        return None
    return pid


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log written)"


# -- the components --------------------------------------------------------------------------


def weaviate_binary(settings: Settings, build: bool = True) -> Path:
    """The pinned weaviate-server, built once with `go install` and cached across checkouts."""
    if settings.weaviate_binary:
        if not settings.weaviate_binary.is_file():
            raise StackError(f"HEADWATER_WEAVIATE_BINARY={settings.weaviate_binary} does not exist")
        return settings.weaviate_binary
    target = settings.cache_dir / "weaviate" / f"v{settings.weaviate_version}" / "weaviate-server"
    if target.is_file() or not build:
        return target
    _go_install(f"{WEAVIATE_MODULE}@v{settings.weaviate_version}", target,
                f"Weaviate v{settings.weaviate_version}",
                "or set HEADWATER_WEAVIATE_BINARY to a weaviate-server binary",
                {"CGO_ENABLED": os.environ.get("CGO_ENABLED", "1")})
    return target


def promtool_binary(settings: Settings, build: bool = True) -> Path:
    """Prometheus's promtool, which checks and unit-tests the alert rules; built once with
    `go install` and cached across checkouts, like Weaviate."""
    target = settings.cache_dir / "promtool" / f"v{PROMTOOL_VERSION}" / "promtool"
    if target.is_file() or not build:
        return target
    # The flags this build was verified with, from the Go module proxy.
    flags = f"{os.environ.get('GOFLAGS', '')} -mod=mod".strip()
    _go_install(f"{PROMTOOL_MODULE}@v{PROMTOOL_VERSION}", target,
                f"promtool v{PROMTOOL_VERSION}", "to check the alert rules", {"GOFLAGS": flags})
    return target


def _go_install(package: str, target: Path, what: str, otherwise: str,
                env: dict[str, str]) -> None:
    go = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go",) if Path(p).exists()), None
    )
    if not go:
        raise StackError(f"{what} is not built yet and Go is not installed: install Go 1.26+ "
                         f"{otherwise}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Building {what} with go install (first time only)...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as gobin:
        result = subprocess.run([go, "install", package],
                                env={**os.environ, "GOBIN": gobin, **env},
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"Building {what} failed", result.stderr[-4000:])
        # Rename into place so an interrupted build never leaves a half-written binary.
        os.replace(Path(gobin) / target.name, target)


def _get_json(url: str, timeout: float = 2.0) -> object | None:
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _weaviate(settings: Settings, run_dir: Path, log_dir: Path) -> Component:
    url = settings.weaviate_url

    def argv() -> list[str]:
        return [
            str(weaviate_binary(settings)),
            "--scheme", "http",
            "--host", settings.weaviate_host,
            "--port", str(settings.weaviate_http_port),
        ]

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/v1/.well-known/ready", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def version() -> str | None:
        meta = _get_json(f"{url}/v1/meta")
        return meta.get("version") if isinstance(meta, dict) else None

    env = {
        "PERSISTENCE_DATA_PATH": str(settings.data_dir / "weaviate"),
        # Anonymous access is safe only because the server binds to loopback.
        "AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED": "true",
        "DEFAULT_VECTORIZER_MODULE": "none",
        "ENABLE_MODULES": "",
        "DISABLE_TELEMETRY": "true",
        "QUERY_DEFAULTS_LIMIT": "25",
        "GRPC_PORT": str(settings.weaviate_grpc_port),
        # The node name is stored in the Raft log: it must stay the same across restarts.
        "CLUSTER_HOSTNAME": "headwater-node1",
        # Weaviate derives a local node's cluster RPC port as the Raft port + 1.
        "CLUSTER_IN_LOCALHOST": "true",
        "CLUSTER_BIND_ADDR": "127.0.0.1",
        "CLUSTER_ADVERTISE_ADDR": "127.0.0.1",
        "CLUSTER_GOSSIP_BIND_PORT": str(settings.weaviate_gossip_port),
        "CLUSTER_DATA_BIND_PORT": str(settings.weaviate_data_port),
        "RAFT_PORT": str(settings.weaviate_raft_port),
        "RAFT_INTERNAL_RPC_PORT": str(settings.weaviate_raft_port + 1),
        # The Go profiler would listen on every interface, on a port two stacks would share.
        "GO_PROFILING_DISABLE": "true",
        "RAFT_BOOTSTRAP_EXPECT": "1",
        "LOG_LEVEL": "info",
    }
    return Component(
        name="weaviate",
        address=url,
        argv=argv,
        env=env,
        healthy=healthy,
        version=version,
        run_dir=run_dir,
        log_dir=log_dir,
        needs_port=settings.weaviate_http_port,
    )


def _prefect_executable() -> str:
    beside = Path(sys.executable).parent / "prefect"
    return str(beside) if beside.exists() else (shutil.which("prefect") or "prefect")


def prefect_env(settings: Settings) -> dict[str, str]:
    """Environment for Prefect processes of this stack: its home, database and API."""
    return {
        "PREFECT_HOME": str(settings.data_dir / "prefect"),
        "PREFECT_API_URL": settings.prefect_api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": settings.resolved_prefect_database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_COLORS": "false",
    }


def _prefect_server(settings: Settings, run_dir: Path, log_dir: Path) -> Component:
    api = settings.prefect_api_url

    def healthy() -> bool:
        return _get_json(f"{api}/health") is True

    def version() -> str | None:
        found = _get_json(f"{api}/admin/version")
        return found if isinstance(found, str) else None

    return Component(
        name="prefect-server",
        address=api.removesuffix("/api"),
        argv=lambda: [
            _prefect_executable(), "server", "start",
            "--host", settings.prefect_host, "--port", str(settings.prefect_port),
        ],
        env=prefect_env(settings),
        healthy=healthy,
        version=version,
        run_dir=run_dir,
        log_dir=log_dir,
        needs_port=settings.prefect_port,
    )


def ensure_work_pool(settings: Settings) -> None:
    """Create the process work pool once; an existing pool is left as it is."""
    api = settings.prefect_api_url
    existing = httpx.get(f"{api}/work_pools/{settings.work_pool}", timeout=10.0)
    if existing.status_code == 200:
        return
    created = httpx.post(
        f"{api}/work_pools/",
        json={"name": settings.work_pool, "type": "process",
              "description": "Local process pool started by `headwater up`."},
        timeout=10.0,
    )
    if created.status_code not in (200, 201, 409):
        raise StackError(
            f"Could not create work pool {settings.work_pool!r}",
            f"{created.status_code} {created.text}",
        )


def _worker(settings: Settings, run_dir: Path, log_dir: Path) -> Component:
    api = settings.prefect_api_url

    def healthy() -> bool:
        try:
            found = httpx.post(
                f"{api}/work_pools/{settings.work_pool}/workers/filter",
                json={},
                timeout=2.0,
            )
        except httpx.HTTPError:
            return False
        return found.status_code == 200 and any(
            w.get("name") == WORKER_NAME and w.get("status") == "ONLINE" for w in found.json()
        )

    server = _prefect_server(settings, run_dir, log_dir)
    return Component(
        name="prefect-worker",
        address=f"pool {settings.work_pool}",
        argv=lambda: [
            _prefect_executable(), "worker", "start",
            "--pool", settings.work_pool, "--type", "process", "--name", WORKER_NAME,
        ],
        # A short poll interval keeps local deployment runs snappy.
        env={**prefect_env(settings), "PREFECT_WORKER_QUERY_SECONDS": "2",
             "PREFECT_WORKER_HEARTBEAT_SECONDS": "5"},
        healthy=healthy,
        version=server.version,
        run_dir=run_dir,
        log_dir=log_dir,
    )


def components(settings: Settings) -> list[Component]:
    run_dir = settings.data_dir / "run"
    log_dir = settings.data_dir / "logs"
    return [
        _weaviate(settings, run_dir, log_dir),
        _prefect_server(settings, run_dir, log_dir),
        _worker(settings, run_dir, log_dir),
    ]


# -- lifecycle -------------------------------------------------------------------------------


def _status_of(component: Component) -> ComponentStatus:
    pid = _recorded_pid(component)
    healthy = pid is not None and component.healthy()
    return ComponentStatus(
        name=component.name,
        address=component.address,
        log=component.log_file,
        pid=pid,
        running=pid is not None,
        healthy=healthy,
        version=component.version() if healthy else None,
    )


def status(settings: Settings) -> list[ComponentStatus]:
    return [_status_of(c) for c in components(settings)]


def _spawn(component: Component) -> int:
    if component.needs_port and _port_in_use("127.0.0.1", component.needs_port):
        raise StackError(
            f"{component.name}: port {component.needs_port} is already in use by a process "
            f"this data dir did not start; stop it or choose another port (see README).",
        )
    component.run_dir.mkdir(parents=True, exist_ok=True)
    component.log_dir.mkdir(parents=True, exist_ok=True)
    argv = component.argv()
    with component.log_file.open("ab") as log:
        log.write(f"\n=== starting {component.name}: {' '.join(argv)}\n".encode())
        log.flush()
        # A session of its own makes the process a group leader, so `down` can stop its children.
        process = subprocess.Popen(
            argv,
            env={**os.environ, **component.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=PROJECT_ROOT,
            start_new_session=True,
        )
    record = {"pid": process.pid, "start_ticks": _process_start_ticks(process.pid), "argv": argv}
    component.pid_file.write_text(json.dumps(record))
    return process.pid


def _wait_healthy(component: Component, pid: int | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is None or _process_start_ticks(pid) is None:
            component.pid_file.unlink(missing_ok=True)
            raise StackError(
                f"{component.name} exited during start-up; see {component.log_file}",
                log_tail(component.log_file),
            )
        if component.healthy():
            return
        time.sleep(0.5)
    raise StackError(
        f"{component.name} was not ready after {timeout_s:.0f}s; see {component.log_file}",
        log_tail(component.log_file),
    )


def up(settings: Settings, only: set[str] | None = None) -> list[ComponentStatus]:
    """Start whatever is not running yet and wait until every component is healthy."""
    chosen = [c for c in components(settings) if only is None or c.name in only]
    if any(c.name == "weaviate" for c in chosen):
        weaviate_binary(settings)  # build before starting anything: a failed build starts nothing
    servers = [c for c in chosen if c.name != "prefect-worker"]
    workers = [c for c in chosen if c.name == "prefect-worker"]
    started: dict[str, int] = {}
    try:
        for component in servers:
            if _recorded_pid(component) is None:
                started[component.name] = _spawn(component)
        # Weaviate and the Prefect server boot in parallel; wait for both.
        for component in servers:
            _wait_healthy(component, started.get(component.name) or _recorded_pid(component),
                          settings.startup_timeout_s)
        for component in workers:
            ensure_work_pool(settings)
            if _recorded_pid(component) is None:
                started[component.name] = _spawn(component)
            _wait_healthy(component, started.get(component.name) or _recorded_pid(component),
                          settings.startup_timeout_s)
    except (StackError, httpx.HTTPError):
        # A failed start leaves nothing of its own running behind.
        down(settings, only=set(started))
        raise
    statuses = [_status_of(c) for c in chosen]
    for item in statuses:
        item.started = item.name in started
    return statuses


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def pid_of(settings: Settings, name: str) -> int | None:
    """The recorded, still-running PID of a component, or None."""
    (component,) = [c for c in components(settings) if c.name == name]
    return _recorded_pid(component)


def process_tree(settings: Settings) -> set[int]:
    """Every live process the stack's recorded PIDs lead to, children included."""
    pids: set[int] = set()
    for component in components(settings):
        pid = _recorded_pid(component)
        if pid is not None:
            pids |= {pid, *_descendants(pid)}
    return pids


def _stop(component: Component, timeout_s: float = 30.0) -> bool:
    pid = _recorded_pid(component)
    if pid is None:
        return False
    tree = {pid, *_descendants(pid)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in tree:
            # Children that left the group (a worker's flow runs may) are signalled directly.
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (timeout_s if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline:
            if all(_process_start_ticks(p) is None for p in tree):
                component.pid_file.unlink(missing_ok=True)
                return True
            time.sleep(0.2)
    raise StackError(f"{component.name} (pid {pid}) did not stop")


def down(settings: Settings, only: set[str] | None = None) -> list[str]:
    """Stop what `up` started, by recorded PID, in reverse start order; returns what stopped."""
    stopped = []
    for component in reversed(components(settings)):
        if only is not None and component.name not in only:
            continue
        if _stop(component):
            stopped.append(component.name)
    return stopped
