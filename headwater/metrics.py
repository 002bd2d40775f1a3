"""Prometheus series for syncs (a textfile per source) and for the API, served from one scrape."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from headwater.settings import Settings

log = logging.getLogger(__name__)

# The outcomes a run's documents end in, as the summary counts them.
OUTCOMES = ("new", "changed", "deleted", "unchanged", "permissions", "quarantined")
# How long the index's object count is reused: aggregating on every scrape is wasted work.
INDEX_COUNT_TTL_S = 30.0
CITATION_BUCKETS = (0, 1, 2, 3, 4, 5, 7, 10, 15, 20)


def metrics_dir(settings: Settings) -> Path:
    return settings.data_dir / "metrics"


def sync_metrics_file(settings: Settings, source: str) -> Path:
    return metrics_dir(settings) / f"sync-{source}.prom"


# -- the sync's textfile --------------------------------------------------------------------


@dataclass(frozen=True)
class _Carried:
    """What a source's previous file holds that the next run adds to or keeps."""

    runs: dict[str, float]
    errors: dict[str, float]
    last_success: float | None


def _carried(path: Path) -> _Carried:
    runs: dict[str, float] = {}
    errors: dict[str, float] = {}
    last_success = None
    if not path.exists():
        return _Carried(runs, errors, last_success)
    try:
        families = list(text_string_to_metric_families(path.read_text()))
    except ValueError as error:
        # A damaged file restarts the counters (Prometheus sees a reset); the run is not lost.
        log.warning("ignoring unreadable %s: %s", path, error)
        return _Carried(runs, errors, last_success)
    for family in families:
        for sample in family.samples:
            if sample.name == "headwater_sync_runs_total":
                runs[sample.labels["status"]] = sample.value
            elif sample.name == "headwater_sync_errors_total":
                errors[sample.labels["type"]] = sample.value
            elif sample.name == "headwater_sync_last_success_time_seconds":
                last_success = sample.value
    return _Carried(runs, errors, last_success)


def error_type(message: str) -> str:
    """The exception name a failed run's message starts with ("QualityGateFailed: ...")."""
    head = message.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", head) else "unknown"


def sync_families(summary: dict[str, Any], ended_at: float,
                  carried: _Carried) -> list[Metric]:
    """Every series of one source after a run, the counters carried over from the last file."""
    source = summary["source"]
    status = summary["status"]

    def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["source", *labels])

    documents = gauge("headwater_sync_documents", "Documents of the last run by outcome "
                      "(seen = all listed; indexed = new + changed)", ["outcome"])
    counts = {k: int(summary.get(k) or 0) for k in OUTCOMES}
    for outcome, value in {**counts, "seen": sum(counts.values()),
                           "indexed": counts["new"] + counts["changed"]}.items():
        documents.add_metric([source, outcome], value)
    chunks = gauge("headwater_sync_chunks_written", "Chunks written to the index by the last run")
    chunks.add_metric([source], summary.get("chunks_written") or 0)
    embedded = gauge("headwater_sync_texts_embedded", "Texts the model encoded in the last run "
                     "(the rest came from the embedding cache)")
    embedded.add_metric([source], summary.get("embedded") or 0)
    stages = gauge("headwater_sync_stage_duration_seconds", "Seconds per stage of the last run",
                   ["stage"])
    for stage, seconds in (summary.get("seconds") or {}).items():
        stages.add_metric([source, stage], float(seconds))
    families: list[Metric] = [documents, chunks, embedded, stages]
    if summary.get("chunks_written"):
        hits = gauge("headwater_sync_embedding_cache_hit_ratio",
                     "Share of the last run's chunks whose vectors came from the cache")
        hits.add_metric([source], max(0.0, 1 - summary["embedded"] / summary["chunks_written"]))
        families.append(hits)
    last_status = gauge("headwater_sync_last_run_status", "1 for the last run's status",
                        ["status"])
    for each in ("completed", "failed"):
        last_status.add_metric([source, each], 1 if status == each else 0)
    ended = gauge("headwater_sync_last_run_end_time_seconds", "When the last run ended (Unix)")
    ended.add_metric([source], ended_at)
    families += [last_status, ended]
    # A run over notified changes only is not a sync of the whole source: lag stays its own.
    listed = summary.get("kind", "sync") == "sync"
    last_success = ended_at if status == "completed" and listed else carried.last_success
    if last_success is not None:
        success = gauge("headwater_sync_last_success_time_seconds",
                        "When the last successful run ended (Unix); lag = time() - this")
        success.add_metric([source], last_success)
        families.append(success)
    runs = CounterMetricFamily("headwater_sync_runs", "Sync runs by final status",
                               labels=["source", "status"])
    totals = {**carried.runs, status: carried.runs.get(status, 0) + 1}
    for each, value in sorted(totals.items()):
        runs.add_metric([source, each], value)
    errors = CounterMetricFamily("headwater_sync_errors", "Failed runs by error type",
                                 labels=["source", "type"])
    failures = dict(carried.errors)
    if status == "failed":
        kind = error_type(summary.get("message") or "")
        failures[kind] = failures.get(kind, 0) + 1
    for kind, value in sorted(failures.items()):
        errors.add_metric([source, kind], value)
    return [*families, runs, errors]


class _Families:
    """A collector of fixed families, so the text format is written by prometheus_client."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def record_sync_run(settings: Settings, summary: dict[str, Any],
                    ended_at: float | None = None) -> Path | None:
    """Write the source's series after a run (completed or failed), atomically: a scraper
    reads either the previous file or this one, never half of one."""
    path = sync_metrics_file(settings, summary["source"])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(sync_families(summary, ended_at or time.time(),
                                              _carried(path))))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".sync-", suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            out.write(generate_latest(registry))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        # Metrics are not worth failing a sync that indexed everything; the gap shows as lag.
        log.warning("could not write sync metrics to %s: %s", path, error)
        return None
    return path


# -- scrape time: the flows' files, lag, schedules, the index and the quarantine -------------


class FlowMetrics:
    """Read at every scrape: every source's textfile merged, plus what only the API can see
    cheaply (sync lag from the state store, schedules, quarantine size, the index's size)."""

    def __init__(self, settings: Settings, count_objects: Callable[[], int]) -> None:
        self.settings = settings
        self.count_objects = count_objects
        self._objects: tuple[float, int] | None = None

    def describe(self) -> list[Metric]:
        # Families vary with the files present; nothing to check for clashes up front.
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("headwater_metrics_part_up",
                               "1 when this part of the scrape could be read", labels=["part"])
        for part, read in (("sync_files", self._sync_files), ("state_db", self._state),
                           ("sources", self._schedules), ("index", self._index)):
            try:
                families = list(read())
            except Exception as error:  # a scrape must report a broken part, not fail whole
                log.warning("metrics part %s failed: %r", part, error)
                up.add_metric([part], 0)
                continue
            up.add_metric([part], 1)
            yield from families
        yield up

    def _sync_files(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for path in sorted(metrics_dir(self.settings).glob("sync-*.prom")):
            try:
                families = list(text_string_to_metric_families(path.read_text()))
            except (OSError, ValueError) as error:
                log.warning("skipping %s: %s", path, error)
                continue
            for family in families:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation,
                                                             family.type))
                into.samples.extend(family.samples)
        yield from merged.values()

    def _state(self) -> Iterator[Metric]:
        from headwater.state import QuarantineRow, SourceRow, StateStore, utcnow

        store = StateStore(self.settings.resolved_state_db_url)
        lag = GaugeMetricFamily("headwater_sync_lag_seconds",
                                "Seconds since the source's last successful sync",
                                labels=["source"])
        held = GaugeMetricFamily("headwater_quarantine_documents",
                                 "Documents held in quarantine now", labels=["source"])
        now = utcnow()
        with store.session() as s:
            for name, at in s.execute(select(SourceRow.name, SourceRow.last_success_at)):
                if at is not None:
                    lag.add_metric([name], (now - at).total_seconds())
            counts = dict(s.execute(select(QuarantineRow.source, func.count())
                                    .group_by(QuarantineRow.source)).all())
            for (name,) in s.execute(select(SourceRow.name)):
                held.add_metric([name], counts.get(name, 0))
        yield lag
        yield held

    def _schedules(self) -> Iterator[Metric]:
        from headwater.config import load_sources
        from headwater.health import schedule_interval_seconds

        interval = GaugeMetricFamily(
            "headwater_source_schedule_interval_seconds",
            "A scheduled source's longest gap between runs (manual sources have none)",
            labels=["source"])
        for source in load_sources(self.settings.config).values():
            seconds = schedule_interval_seconds(source.schedule)
            if seconds is not None:
                interval.add_metric([source.name], seconds)
        yield interval

    def _index(self) -> Iterator[Metric]:
        now = time.monotonic()
        if self._objects is None or now - self._objects[0] > INDEX_COUNT_TTL_S:
            self._objects = (now, self.count_objects())
        objects = GaugeMetricFamily("headwater_index_objects",
                                    "Objects (chunks) in the collection", labels=["collection"])
        objects.add_metric([self.settings.collection], self._objects[1])
        yield objects


# -- the API's answers --------------------------------------------------------------------


@dataclass
class AnswerMetrics:
    """What answers were like: how often anything was found, and how much was cited."""

    questions: Counter
    answered: Counter
    empty: Counter
    rate: Gauge
    citations: Histogram
    asked: int = 0
    found: int = 0
    # Questions are answered on a thread pool; the ratio's two counts move together.
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> AnswerMetrics:
        return cls(
            Counter("headwater_questions_total", "Questions answered (any outcome)",
                    registry=registry),
            Counter("headwater_answered_questions_total",
                    "Answers with at least one source", registry=registry),
            Counter("headwater_empty_results_total", "Questions that found nothing the "
                    "caller may read", registry=registry),
            Gauge("headwater_answer_rate_ratio", "Answers with a source / questions, since "
                  "the process started", registry=registry),
            Histogram("headwater_answer_citations", "Sources cited per answer",
                      buckets=CITATION_BUCKETS, registry=registry),
        )

    def observe(self, cited: int) -> None:
        with self.lock:
            self.asked, self.found = self.asked + 1, self.found + (1 if cited else 0)
            self.rate.set(self.found / self.asked)
        self.questions.inc()
        (self.answered if cited else self.empty).inc()
        self.citations.observe(cited)



@dataclass
class FeedbackMetrics:
    """Users' ratings of answers. Labels are the rating alone: comments are free text and
    request ids unbounded, so neither ever becomes a label."""

    ratings: Counter
    ratio: Gauge
    up: int = 0
    down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> FeedbackMetrics:
        ratings = Counter("headwater_feedback_total", "Answer ratings by users", ["rating"],
                          registry=registry)
        for rating in ("up", "down"):
            ratings.labels(rating)  # both series exist from the start, at zero
        return cls(ratings, Gauge("headwater_feedback_positive_ratio", "Up / all ratings, "
                                  "since the process started", registry=registry))

    def observe(self, positive: bool) -> None:
        with self.lock:
            self.up, self.down = self.up + positive, self.down + (not positive)
            self.ratio.set(self.up / (self.up + self.down))
        self.ratings.labels("up" if positive else "down").inc()
