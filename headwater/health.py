"""Deep health checks (`headwater status --deep`): every dependency, each with its own deadline."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, select, text

from headwater.config import Schedule, SourceConfig, load_sources
from headwater.settings import Settings

MIN_FREE_BYTES = 1 << 30
# A source is overdue when its last success is older than this many schedule intervals.
OVERDUE_INTERVALS = 3
CHECK_TIMEOUT_S = 20.0
# Loading the model from disk is the slowest healthy check on a cold process.
MODEL_TIMEOUT_S = 90.0
CRON_HORIZON = datetime(2026, 1, 1)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def schedule_interval_seconds(schedule: Schedule | None) -> float | None:
    """The longest gap between a schedule's runs (None for a manual source), so a cron that
    skips weekends is judged by its weekend gap, never flagged every Monday."""
    if schedule is None:
        return None
    if schedule.interval_s:
        return float(schedule.interval_s)
    if not schedule.cron:
        return None
    from cronsim import CronSim

    fires = CronSim(schedule.cron, datetime(2024, 1, 1))
    # Up to two years or 5000 fires: enough to see the gaps a cron makes (weekends, months).
    previous, longest = next(fires), timedelta(0)
    for _ in range(5000):
        fire = next(fires)
        longest, previous = max(longest, fire - previous), fire
        if fire >= CRON_HORIZON:
            break
    return longest.total_seconds()


def _with_deadline(name: str, check: Callable[[], str], timeout_s: float) -> Callable[[], Check]:
    """Run a check in a daemon thread: a hung dependency fails its check and never holds the
    process open after the verdict."""
    box: dict[str, Check] = {}

    def run() -> None:
        try:
            box["result"] = Check(name, True, check())
        except Exception as error:  # any failure of a dependency is that check's verdict
            box["result"] = Check(name, False, _describe(error))

    thread = threading.Thread(target=run, name=f"check-{name}", daemon=True)
    thread.start()

    def verdict() -> Check:
        thread.join(timeout_s)
        return box.get("result") or Check(name, False, f"no answer within {timeout_s:.0f} s")

    return verdict


def _describe(error: Exception) -> str:
    message = getattr(error, "user_message", None) or str(error) or type(error).__name__
    return message.splitlines()[0][:300]


class CheckFailed(Exception):
    """A dependency answered, but not as a healthy one does."""


def weaviate_check(settings: Settings) -> str:
    from tasks.index import CHUNK_PROPERTIES, alias_target, connect_index

    with connect_index(settings) as client:
        if not client.is_ready():
            raise CheckFailed(f"Weaviate at {settings.weaviate_url} is not ready")
        version = client.get_meta().get("version")
        if not client.collections.exists(settings.collection):
            return (f"Weaviate {version} at {settings.weaviate_url}; collection "
                    f"{settings.collection} not created yet (the first sync creates it)")
        have = {p.name for p in client.collections.use(settings.collection).config.get()
                .properties}
        missing = [p.name for p in CHUNK_PROPERTIES if p.name not in have]
        if missing:
            raise CheckFailed(f"collection {settings.collection} lacks {', '.join(missing)}: "
                              "run a sync to add them")
        # Which version queries use now (a reindex switches it); no alias: made before them.
        target = alias_target(client, settings.collection)
        return (f"Weaviate {version} at {settings.weaviate_url}; {settings.collection} "
                f"(-> {target or 'a collection made before aliases'}) has all "
                f"{len(CHUNK_PROPERTIES)} properties")


def state_db_check(settings: Settings) -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from headwater.state import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    heads = set(ScriptDirectory.from_config(config).get_heads())
    url = settings.resolved_state_db_url
    # A plain engine: StateStore would migrate on connect and hide a database left behind.
    engine = create_engine(url, connect_args={"timeout": 10} if url.startswith("sqlite")
                           else {"connect_timeout": 10})
    try:
        with engine.connect() as connection:
            current = {row[0] for row in
                       connection.execute(text("SELECT version_num FROM alembic_version"))}
    finally:
        engine.dispose()
    if current != heads:
        raise CheckFailed(f"migrations at {', '.join(sorted(current)) or 'none'}, head is "
                          f"{', '.join(sorted(heads))}: run any headwater command that opens "
                          "the state store to migrate")
    return f"migrations at head ({', '.join(sorted(heads))})"


def embedding_check(settings: Settings) -> str:
    from tasks.embed import encode, load_embedder

    vector = encode(load_embedder(settings.embedding_model, settings.embedding_backend,
                                  settings.cache_dir), ["health check"])
    if vector.shape[0] != 1 or not vector.shape[1]:
        raise CheckFailed(f"{settings.embedding_model} returned an empty vector")
    return f"{settings.embedding_model} embeds ({vector.shape[1]} dimensions)"


def prefect_check(settings: Settings) -> str:
    response = httpx.get(f"{settings.prefect_api_url}/health", timeout=CHECK_TIMEOUT_S)
    if response.status_code != 200:
        raise CheckFailed(f"Prefect API at {settings.prefect_api_url} answered "
                          f"{response.status_code}")
    return f"Prefect API at {settings.prefect_api_url} is healthy"


def disk_check(settings: Settings, min_free_bytes: int = MIN_FREE_BYTES) -> str:
    where = Path(settings.data_dir)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    gib = 1 << 30
    detail = f"{free / gib:.1f} GiB free in {where} (minimum {min_free_bytes / gib:.1f} GiB)"
    if free < min_free_bytes:
        raise CheckFailed(detail)
    return detail


def last_successes(settings: Settings) -> dict[str, datetime | None]:
    from headwater.state import SourceRow

    engine = create_engine(settings.resolved_state_db_url)
    try:
        with engine.connect() as connection:
            return dict(connection.execute(select(SourceRow.name, SourceRow.last_success_at))
                        .all())
    finally:
        engine.dispose()


def source_freshness(source: SourceConfig, last_success: datetime | None,
                     now: datetime) -> str:
    """Whether a source synced within its schedule; raises CheckFailed when it is overdue."""
    interval = schedule_interval_seconds(source.schedule)
    if interval is None:
        since = f"last success {last_success:%Y-%m-%d %H:%M} UTC" if last_success else (
            "never synced")
        return f"manual (no schedule); {since}"
    every = timedelta(seconds=interval)
    if last_success is None:
        raise CheckFailed(f"never synced successfully (scheduled every {every})")
    age = now - last_success
    if age > OVERDUE_INTERVALS * every:
        raise CheckFailed(f"overdue: last success {age.total_seconds() / 3600:.1f} h ago, "
                          f"more than {OVERDUE_INTERVALS} intervals of {every}")
    return f"last success {age.total_seconds():.0f} s ago (every {every})"


def deep_checks(settings: Settings, timeout_s: float = CHECK_TIMEOUT_S,
                min_free_bytes: int = MIN_FREE_BYTES,
                now: datetime | None = None) -> list[Check]:
    """Every check, run side by side, each failing on its own deadline."""
    from headwater.state import utcnow

    now = now or utcnow()
    running = [
        _with_deadline("weaviate", lambda: weaviate_check(settings), timeout_s),
        _with_deadline("state_db", lambda: state_db_check(settings), timeout_s),
        _with_deadline("embedding_model", lambda: embedding_check(settings),
                       max(timeout_s, MODEL_TIMEOUT_S)),
        _with_deadline("prefect_api", lambda: prefect_check(settings), timeout_s),
        _with_deadline("disk", lambda: disk_check(settings, min_free_bytes), timeout_s),
    ]
    found: dict[str, datetime | None] = {}

    def read_successes() -> str:
        found.update(last_successes(settings))
        return ""

    successes = _with_deadline("sources", read_successes, timeout_s)
    results = [verdict() for verdict in running]
    try:
        sources = load_sources(settings.config)
    except Exception as error:  # a broken sources file is this check's verdict
        return [*results, Check("sources", False, _describe(error))]
    read = successes()
    if not read.ok:
        return [*results, Check("sources", False, f"last syncs unreadable: {read.detail}")]
    for source in sources.values():
        try:
            results.append(Check(f"source:{source.name}", True,
                                 source_freshness(source, found.get(source.name), now)))
        except CheckFailed as overdue:
            results.append(Check(f"source:{source.name}", False, str(overdue)))
    return results


def render_checks(checks: list[Check]) -> str:
    width = max((len(c.name) for c in checks), default=10) + 2
    return "\n".join(f"{c.name:<{width}}{'OK' if c.ok else 'FAIL':<6}{c.detail}" for c in checks)
