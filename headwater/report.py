"""`headwater report`: what the audit trail and the sync runs say about a window, and what to do."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from headwater.state import AuditRow, StateStore, SyncRunRow, utcnow

# Past these, the report recommends something.
P95_LATENCY_MS = 1500.0
EMPTY_SHARE = 0.2
STAGE_SHARE = 0.5
FAILED_RUN_SHARE = 0.2

_WINDOW = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

# What to do about a stage that takes most of a sync's time.
STAGE_ADVICE = {
    "embed": "enable batching/quantization (HEADWATER_EMBEDDING_BATCH_SIZE, a smaller or "
             "quantized model) or embed on a GPU",
    "fetch": "the source is slow to read: check throttling in the run logs, raise the "
             "source's batch_size, or sync it less often",
    "list": "listing the source is slow: prefer a connector cursor (delta) over a full listing",
    "parse": "parsing dominates: exclude large binary files or raise max_bytes limits carefully",
    "compliance": "PII detection dominates: narrow the policy's entity types or recognizers",
    "index": "Weaviate writes are slow: check its CPU and disk, or write larger batches",
}


def parse_window(window: str) -> timedelta:
    """"24h", "7d", "30m" as a duration."""
    found = _WINDOW.match(window.strip().lower())
    if not found:
        raise ValueError(f"window {window!r} is not like 30m, 24h or 7d")
    return timedelta(seconds=int(found.group(1)) * _UNIT_S[found.group(2)])


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (no interpolation: the figure is one that was observed)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * share // 1))
    return ordered[int(rank) - 1]


@dataclass
class SourceRuns:
    source: str
    runs: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Report:
    since: datetime
    until: datetime
    questions: int = 0
    by_channel: Counter[str] = field(default_factory=Counter)
    answered: int = 0
    empty: int = 0
    answered_by: Counter[str] = field(default_factory=Counter)
    latency_ms: dict[str, float] = field(default_factory=dict)
    timed: int = 0
    runs: dict[str, SourceRuns] = field(default_factory=dict)
    stage_seconds: Counter[str] = field(default_factory=Counter)
    quarantined: int = 0
    expectations_failed: Counter[str] = field(default_factory=Counter)
    recommendations: list[str] = field(default_factory=list)

    @property
    def answer_rate(self) -> float | None:
        return self.answered / self.questions if self.questions else None

    @property
    def sync_seconds(self) -> float:
        return sum(self.stage_seconds.values())

    def slowest_stages(self, n: int = 3) -> list[tuple[str, float, float]]:
        """(stage, seconds, share of sync time), slowest first."""
        total = self.sync_seconds or 1.0
        return [(s, t, t / total) for s, t in self.stage_seconds.most_common(n) if t > 0]


def build_report(store: StateStore, window: timedelta, now: datetime | None = None) -> Report:
    """Summarise the queries and sync runs of the window ending now, with recommendations."""
    until = now or utcnow()
    report = Report(since=until - window, until=until)
    latencies: list[float] = []
    with store.session() as s:
        queries = s.execute(select(AuditRow.resource, AuditRow.outcome, AuditRow.details)
                            .where(AuditRow.action == "query", AuditRow.at >= report.since,
                                   AuditRow.at <= until))
        for channel, outcome, details in queries:
            details = details or {}
            report.questions += 1
            report.by_channel[channel] += 1
            report.answered += outcome == "answered"
            report.empty += outcome == "no_results"
            report.answered_by[details.get("answered_by") or "unknown"] += 1
            if isinstance(details.get("processing_time_ms"), int | float):
                latencies.append(float(details["processing_time_ms"]))
        runs = s.execute(select(SyncRunRow.source, SyncRunRow.status, SyncRunRow.summary)
                         .where(SyncRunRow.finished_at.is_not(None),
                                SyncRunRow.finished_at >= report.since,
                                SyncRunRow.finished_at <= until))
        for source, status, summary in runs:
            summary = summary or {}
            tally = report.runs.setdefault(source, SourceRuns(source))
            tally.runs += 1
            if status == "failed":
                tally.failed += 1
                tally.errors[(summary.get("message") or "unknown").split(":", 1)[0]] += 1
            report.stage_seconds.update({k: float(v) for k, v in
                                         (summary.get("seconds") or {}).items()})
            report.quarantined += int(summary.get("quarantined") or 0)
            for row in summary.get("quality") or []:
                if row.get("result") != "pass":
                    report.expectations_failed[row.get("expectation") or "unknown"] += 1
    if latencies:
        report.timed = len(latencies)
        report.latency_ms = {name: percentile(latencies, share)
                             for name, share in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
    report.recommendations = recommendations(report)
    return report


def recommendations(report: Report) -> list[str]:
    advice = []
    p95 = report.latency_ms.get("p95")
    if p95 is not None and p95 > P95_LATENCY_MS:
        advice.append(f"p95 latency {p95 / 1000:.1f} s over {P95_LATENCY_MS / 1000:.1f} s: "
                      "check Weaviate's load and the LLM endpoints' latency, lower top_k, or "
                      "run more API replicas")
    if report.questions and report.empty / report.questions > EMPTY_SHARE:
        advice.append(f"{report.empty} of {report.questions} questions "
                      f"({report.empty / report.questions:.0%}) found nothing the caller may "
                      "read: check the sources' principals and the identity provider's groups, "
                      "or whether the topic is indexed at all")
    for stage, _, share in report.slowest_stages(1):
        if share >= STAGE_SHARE and stage in STAGE_ADVICE:
            advice.append(f"{_stage_name(stage)} is {share:.0%} of sync time: "
                          f"{STAGE_ADVICE[stage]}")
    for tally in sorted(report.runs.values(), key=lambda t: t.source):
        if tally.failed and tally.failed / tally.runs >= FAILED_RUN_SHARE:
            advice.append(f"{tally.failed} of {tally.runs} runs of {tally.source!r} failed: see "
                          f"`headwater quality report --source {tally.source}` and the run logs")
    if report.quarantined:
        advice.append(f"{report.quarantined} documents were quarantined: see "
                      "`headwater quarantine` for the stage and reason of each")
    return advice


def _stage_name(stage: str) -> str:
    return {"embed": "embedding", "index": "indexing", "list": "listing",
            "fetch": "fetching", "parse": "parsing"}.get(stage, stage)


def render_report(report: Report) -> str:
    lines = [f"Headwater report {report.since:%Y-%m-%d %H:%M} to {report.until:%Y-%m-%d %H:%M} "
             "UTC", "", "Requests"]
    channels = ", ".join(f"{c} {n}" for c, n in
                         sorted(report.by_channel.items(), key=lambda cn: (-cn[1], cn[0])))
    lines.append(f"  questions: {report.questions}" + (f" ({channels})" if channels else ""))
    if report.questions:
        lines.append(f"  answered with sources: {report.answered} ({report.answer_rate:.0%}); "
                     f"found nothing: {report.empty}")
        lines.append("  answered by: " + ", ".join(
            f"{k} {n}" for k, n in report.answered_by.most_common()))
    if report.latency_ms:
        lines.append("  latency: " + ", ".join(f"{k} {v:.0f} ms" for k, v in
                                               report.latency_ms.items())
                     + f" (over {report.timed} timed questions)")
    elif report.questions:
        lines.append("  latency: not recorded in the audit trail for these questions")
    lines += ["", "Syncs"]
    if not report.runs:
        lines.append("  no finished runs")
    for tally in sorted(report.runs.values(), key=lambda t: t.source):
        errors = ", ".join(f"{e} x{n}" for e, n in tally.errors.most_common())
        lines.append(f"  {tally.source}: {tally.runs} runs, {tally.failed} failed"
                     + (f" ({errors})" if errors else ""))
    if report.slowest_stages():
        lines.append(f"  slowest stages (of {report.sync_seconds:.1f} s): " + ", ".join(
            f"{s} {t:.1f} s ({share:.0%})" for s, t, share in report.slowest_stages()))
    lines += ["", "Quality",
              f"  documents quarantined: {report.quarantined}"]
    if report.expectations_failed:
        lines.append("  expectations failed: " + ", ".join(
            f"{e} x{n}" for e, n in report.expectations_failed.most_common(5)))
    lines += ["", "Recommendations"]
    lines += [f"  - {r}" for r in report.recommendations] or ["  none: every figure is within "
                                                             "its threshold"]
    return "\n".join(lines)
