"""Database source benchmark: rows/s and the sync process's peak RSS at 10,000 and 100,000 rows."""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("pump impeller valve pressure flow service customer order warranty inspection seal "
         "bearing motor housing calibration schedule supplier invoice safety procedure engineer "
         "approval report quarter budget release incident outage network database backup "
         "restore policy employee manager training audit compliance contract delivery quality "
         "sensor telemetry").split()
BATCH_ROWS = 10_000


def distinct_texts(count: int, seed: int = 11) -> list[str]:
    """`count` different short texts (one chunk each): rows reuse them, so each embeds once."""
    rng = random.Random(seed)
    texts = []
    for i in range(count):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))).capitalize()
                     + "." for _ in range(rng.randint(3, 5))]
        texts.append(f"Ticket note {i}. " + " ".join(sentences))
    return texts


@contextmanager
def private_postgres() -> Iterator[str]:
    """A PostgreSQL server of the benchmark's own, as tests/conftest.py starts one."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise SystemExit("PostgreSQL is not installed: run deployments/local/install.sh, "
                         "or pass --url or --sqlite")
    bindir, data = found[-1].parent, Path(tempfile.mkdtemp(prefix="headwater-bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")  # PostgreSQL refuses to run as root
        os.chown(data, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "trust",
                    "-U", "postgres", "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l",
                    str(data / "server.log"), "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast",
                        "-w", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def create_table(url: str, table: str, rows: int, texts: list[str]) -> None:
    """`rows` rows whose bodies cycle through `texts`, 10,000 per insert."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    start = datetime(2024, 1, 1)
    with engine.begin() as db:
        db.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, body TEXT NOT NULL, "
                        "readers TEXT NOT NULL, updated_at TIMESTAMP NOT NULL)"))
        for first in range(0, rows, BATCH_ROWS):
            db.execute(text(f"INSERT INTO {table} VALUES (:id, :body, :readers, :at)"), [
                {"id": i, "body": texts[i % len(texts)], "readers": "group:staff",
                 "at": start + timedelta(seconds=i)}
                for i in range(first, min(rows, first + BATCH_ROWS))])
    engine.dispose()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child_sync(source: str) -> None:
    """Runs in its own process, so ru_maxrss is the sync's own peak and nothing else's."""
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((round(time.perf_counter() - started, 1), round(rss_mib(), 1)))

    from flows.sync import sync_source

    imported = rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = sync_source(source)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    print(json.dumps({"summary": summary, "seconds": seconds, "rss_after_import_mib": imported,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "samples": samples}))


def run_sync(source: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child-sync", source], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the sync of {source} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def curve(samples: list[list[float]], points: int = 12) -> list[list[float]]:
    """About `points` evenly spaced (seconds, MiB) samples, the last one included."""
    if len(samples) <= points:
        return samples
    return [samples[round(i * (len(samples) - 1) / (points - 1))] for i in range(points)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--distinct", type=int, default=2000,
                        help="Distinct row texts; each is embedded once (the cache does the rest).")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--url", help="A PostgreSQL (or any SQLAlchemy) URL to create tables in.")
    parser.add_argument("--sqlite", action="store_true", help="Use a SQLite file instead.")
    parser.add_argument("--output", type=Path, help="Write the figures as JSON here too.")
    parser.add_argument("--child-sync", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_sync:
        child_sync(args.child_sync)
        return

    work = Path(tempfile.mkdtemp(prefix="headwater-bench-db-"))
    database: AbstractContextManager[str] = (
        nullcontext(args.url) if args.url
        else nullcontext(f"sqlite:///{work / 'rows.db'}") if args.sqlite
        else private_postgres())
    texts = distinct_texts(args.distinct)
    tag = uuid.uuid4().hex[:6]
    tables = {"warm": args.distinct, **{f"rows_{n}": n for n in args.rows}}
    with database as url:
        for table, rows in tables.items():
            started = time.perf_counter()
            create_table(url, f"{table}_{tag}", rows, texts)
            print(f"created {table}_{tag}: {rows:,} rows in {time.perf_counter() - started:.1f} s",
                  file=sys.stderr)
        (work / "headwater.yaml").write_text(json.dumps({"sources": [{
            # A Prefect artifact key (sync-<source>) allows dashes, not underscores.
            "name": table.replace("_", "-"), "type": "database", "batch_size": args.batch_size,
            "params": {"url": url, "table": f"{table}_{tag}", "id_column": "id",
                       "text_template": "{body}", "title_template": "Row {id}",
                       "cursor_column": "updated_at", "principals_column": "readers"},
        } for table in tables]}))
        # One state DB for all runs: its embedding cache is warmed once, before the clock.
        base_env = {**os.environ, "HEADWATER_CONFIG": str(work / "headwater.yaml"),
                    "HEADWATER_STATE_DB_URL": f"sqlite:///{work / 'state.db'}"}
        collections, results = [], {}
        try:
            for table in tables:
                collection = f"Bench{table.title().replace('_', '')}{tag}"
                collections.append(collection)
                print(f"syncing {table} into {collection}", file=sys.stderr)
                results[table] = run_sync(table.replace("_", "-"),
                                          {**base_env, "HEADWATER_COLLECTION": collection})
        finally:
            from headwater.settings import get_settings
            from tasks.index import connect_index, delete_index

            with connect_index(get_settings()) as client:
                for collection in collections:
                    delete_index(client, collection)
            shutil.rmtree(work, ignore_errors=True)

    figures: dict[str, object] = {
        "database": "sqlite" if args.sqlite else ("given --url" if args.url else "postgresql"),
        "distinct_texts": args.distinct, "batch_size": args.batch_size,
        "warm_up": {"rows": args.distinct, "seconds": round(results["warm"]["seconds"], 1),
                    "embedded": results["warm"]["summary"]["embedded"]},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    for n in args.rows:
        run = results[f"rows_{n}"]
        assert run["summary"]["new"] == n, run["summary"]
        figures[str(n)] = {
            "rows": n, "seconds": round(run["seconds"], 1),
            "rows_per_s": round(n / run["seconds"], 1),
            "embedded": run["summary"]["embedded"],
            "peak_rss_mib": round(run["peak_rss_mib"]),
            "rss_after_import_mib": round(run["rss_after_import_mib"]),
            "stage_seconds": run["summary"]["seconds"],
            "rss_curve_s_mib": curve(run["samples"]),
        }
    if len(args.rows) > 1:
        low, high = min(args.rows), max(args.rows)
        figures["peak_rss_ratio"] = round(figures[str(high)]["peak_rss_mib"]
                                          / figures[str(low)]["peak_rss_mib"], 3)
    figures["note"] = (f"row bodies are drawn from {args.distinct:,} distinct texts, embedded "
                       "once in a warm-up sync; the timed syncs read every embedding from the "
                       "cache, so rows/s measures the pipeline without the model's encode cost")
    print(json.dumps(figures, indent=2))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
