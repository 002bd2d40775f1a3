"""Change notifications: kept per document until indexed, announced, and read as pages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from connectors.base import ChangesFor
from headwater.settings import Settings
from headwater.state import PendingChange, StateStore

if TYPE_CHECKING:  # the API accepts notifications without importing the whole pipeline
    from tasks.ingest import Batch, SyncContext

CHANGED_EVENT = "headwater.document.changed"
# The pending row of a notification that named no documents ("the list changed"): no real
# document has an empty id.
LIST_CHANGED = ""
# An event names at most this many documents: a burst of thousands must not make one huge
# event. The pending table, not the event, is the record of what changed.
EVENT_DOC_IDS = 100
MAX_DOC_ID = 1000  # the longest id the state store keeps

# (event name, resource, payload) -> sent; Prefect's emit_event in production.
Emitter = Callable[[str, dict[str, str], dict[str, Any]], object]


@dataclass(frozen=True)
class ChangeNotice:
    """What a notification says: these documents of a source changed, or only that its list
    did (a SharePoint webhook names no items), in which case the change log is read."""

    source: str
    doc_ids: tuple[str, ...] = ()
    list_changed: bool = False


def change_event(notice: ChangeNotice) -> tuple[dict[str, str], dict[str, Any]]:
    """The resource and payload of the `headwater.document.changed` event for a notice."""
    named = list(dict.fromkeys(notice.doc_ids))
    resource = {"prefect.resource.id": f"headwater.source.{notice.source}",
                "headwater.source": notice.source}
    payload = {"doc_ids": named[:EVENT_DOC_IDS], "count": len(named),
               "truncated": len(named) > EVENT_DOC_IDS, "list_changed": notice.list_changed}
    return resource, payload


def emit_prefect_event(event: str, resource: dict[str, str], payload: dict[str, Any]) -> None:
    # Imported here: everything else in this module runs without Prefect.
    from prefect.events import emit_event

    emit_event(event=event, resource=resource, payload=payload)


def accept_changes(store: StateStore, notice: ChangeNotice,
                   emit: Emitter = emit_prefect_event) -> int:
    """Record the notice's documents as pending (durably, once per document), then announce
    them; returns how many documents were recorded. Recorded first: an event lost on the way
    costs a delay until the next one, never a change."""
    ids = [d for d in notice.doc_ids if d and len(d) <= MAX_DOC_ID]
    if notice.list_changed:
        ids.append(LIST_CHANGED)
    recorded = store.note_changes(notice.source, ids)
    if recorded:
        emit(CHANGED_EVENT, *change_event(ChangeNotice(
            notice.source, tuple(d for d in ids if d != LIST_CHANGED), notice.list_changed)))
    return recorded


def any_pending(settings: Settings, source: str) -> bool:
    """Whether a notification waits for the source: a run triggered after another run took
    everything ends here, before it opens the source or loads the model."""
    return bool(StateStore(settings.resolved_state_db_url).pending_changes(source))


def drain_changes(ctx: SyncContext) -> list[PendingChange]:
    """Every notification pending for the run's source, as read now."""
    return ctx.store.pending_changes(ctx.source.name)


def change_pages(ctx: SyncContext, pending: Iterable[PendingChange]) -> Iterator[Batch]:
    """Pending documents as pages of changes. A connector that can look at named documents
    (`changes_for`) decides each one's change now, exactly as its listing would; otherwise, or
    when a notification named none, or when the source must be read in full anyway (its
    processing changed), the source's own listing from its stored cursor is read."""
    from tasks.ingest import Batch, list_pages

    ids = [p.doc_id for p in pending]
    if ctx.full or LIST_CHANGED in ids or not isinstance(ctx.connector, ChangesFor):
        yield from list_pages(ctx)
        # Read in full once: the run's later rounds compare with what this one indexed.
        ctx.full = False
        return
    # An earlier round of this run may have indexed some of these: compare with the store.
    ctx.known = ctx.store.known_documents(ctx.source.name)
    # A few documents do not bring the whole source to the run's processing.
    ctx.processing = None
    size = ctx.source.batch_size
    for start in range(0, len(ids), size):
        started = time.perf_counter()
        page = ctx.connector.changes_for(ids[start : start + size], ctx.known)
        batch = Batch(page.changes, page.cursor, page.unchanged)
        batch.seconds["list"] = time.perf_counter() - started
        yield batch


def clear_changes(ctx: SyncContext, indexed: Iterable[PendingChange]) -> int:
    """Forget the notifications a round has indexed and committed; returns how many."""
    return ctx.store.clear_changes(ctx.source.name, indexed)
