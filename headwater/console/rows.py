"""What the console's pages show: source health, quarantine, privacy requests, cited answers."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from markupsafe import Markup, escape

from headwater.config import SourceConfig
from headwater.console.runs import Deployment, RunState
from headwater.health import CheckFailed, schedule_interval_seconds, source_freshness
from headwater.records import QueryResponse
from headwater.settings import Settings
from headwater.state import AuditRow, QuarantinedDocument, StateStore


def _span(seconds: float) -> str:
    """A duration as people say it: 45 s, 12 min, 3.5 h, 2.0 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


@dataclass(frozen=True)
class SourceHealth:
    name: str
    type: str
    schedule: str
    last_success: datetime | None
    lag: str
    overdue: bool
    verdict: str
    documents: int
    chunks: int
    quarantined: int
    deployment: Deployment | None
    runs_url: str


def source_health(settings: Settings, sources: Iterable[SourceConfig], store: StateStore,
                  last_success: Mapping[str, datetime | None], chunks: Mapping[str, int],
                  deployments: Mapping[str, Deployment], now: datetime) -> list[SourceHealth]:
    """One row per configured source: freshness against its schedule (the overdue rule of
    `headwater status --deep`), counts, and where its runs are."""
    quarantine: dict[str, int] = {}
    for entry in store.quarantined():
        quarantine[entry.source] = quarantine.get(entry.source, 0) + 1
    rows = []
    for source in sources:
        success = last_success.get(source.name)
        interval = schedule_interval_seconds(source.schedule)
        try:
            verdict, overdue = source_freshness(source, success, now), False
        except CheckFailed as late:
            verdict, overdue = str(late), True
        deployment = deployments.get(source.name)
        rows.append(SourceHealth(
            name=source.name, type=source.type,
            schedule=f"every {_span(interval)}" if interval else "manual",
            last_success=success,
            lag=_span((now - success).total_seconds()) if success else "never synced",
            overdue=overdue, verdict=verdict,
            documents=store.document_count(source.name), chunks=chunks.get(source.name, 0),
            quarantined=quarantine.get(source.name, 0), deployment=deployment,
            runs_url=deployment.url if deployment else
            f"{settings.resolved_prefect_ui_url}/runs"))
    return rows


def visible_quarantine(store: StateStore, principals: Sequence[str], see_all: bool,
                       source: str | None = None, stage: str | None = None
                       ) -> tuple[list[QuarantinedDocument], int]:
    """The quarantined documents a caller may see, filtered, and how many were withheld.

    A document id can name what a document is about, so a caller who is not an admin sees
    only documents whose readers (of the version last indexed) include them; one never
    indexed has no known readers yet and is withheld.
    """
    entries = [e for e in store.quarantined(source or None) if not stage or e.stage == stage]
    if see_all:
        return entries, 0
    readers = store.document_details((e.source, e.doc_id) for e in entries)
    mine = set(principals)
    shown = [e for e in entries
             if mine & set(readers.get((e.source, e.doc_id), (None, []))[1])]
    return shown, len(entries) - len(shown)


def quarantine_stages(store: StateStore) -> list[str]:
    return sorted({e.stage for e in store.quarantined()})


_MARKER = re.compile(r"\[(\d+)\]")


def cited_answer(response: QueryResponse) -> Markup:
    """The answer's text, escaped, with each [n] linked to the n-th listed source."""
    known = {s.n for s in response.sources}
    text = str(escape(response.answer))

    def link(match: re.Match[str]) -> str:
        n = int(match.group(1))
        if n not in known:
            return match.group(0)
        return f'<a href="#source-{n}" class="citation" aria-label="source {n}">[{n}]</a>'

    return Markup(_MARKER.sub(link, text))


def source_dates(store: StateStore, response: QueryResponse) -> dict[int, datetime | None]:
    """Citation number -> the document's modification time at its source, where known."""
    details = store.document_details((s.source, s.doc_id) for s in response.sources)
    return {s.n: details.get((s.source, s.doc_id), (None, []))[0] for s in response.sources}


@dataclass(frozen=True)
class PrivacyRequestRow:
    run: RunState
    kind: str
    requested_by: str
    scope: str
    outcome: str | None
    counts: dict[str, Any]
    export_ready: bool


def naive_utc(when: datetime | None) -> datetime | None:
    return when.astimezone(UTC).replace(tzinfo=None) if when and when.tzinfo else when


def privacy_rows(runs: Sequence[RunState], closings: Sequence[AuditRow],
                 exports: Mapping[str, bool]) -> list[PrivacyRequestRow]:
    """Each request with what its audit entry says it did: the entry naming its flow run
    (or, for requests from before entries named it, the entry of the same kind and officer
    written while its run was going)."""
    rows = []
    for run in runs:
        kind = str(run.parameters.get("kind", ""))
        by = str(run.parameters.get("requested_by", ""))
        started, ended = naive_utc(run.start_time), naive_utc(run.end_time)
        closing = next((e for e in closings if e.outcome != "started"
                        and (e.details or {}).get("flow_run_id") == run.id), None)
        if closing is None and started and ended:
            slack = timedelta(seconds=5)
            closing = next((e for e in closings if e.action == f"privacy.{kind}"
                            and e.actor == by and e.outcome != "started"
                            and started - slack <= e.at <= ended + slack), None)
        counts = {k: v for k, v in (closing.details or {}).items()
                  if isinstance(v, int) and not isinstance(v, bool)} if closing else {}
        rows.append(PrivacyRequestRow(
            run=run, kind=kind, requested_by=by, scope=str(run.parameters.get("scope", "")),
            outcome=closing.outcome if closing else None, counts=counts,
            export_ready=run.state_type == "COMPLETED" and exports.get(run.id, False)))
    return rows

