"""The connector protocol every source implements, and the records it speaks in."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

from headwater.errors import TransientError
from headwater.records import SourceDocument
from headwater.state import KnownDocument

# A cursor is whatever a source needs to resume (a change token, a timestamp, a key): it must
# survive json.dumps, because the state store keeps it between runs.
Cursor = dict[str, Any]
T = TypeVar("T")


class ChangeKind(StrEnum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"
    PERMISSIONS = "permissions"  # only who may read it changed: no re-embedding needed
    TOUCHED = "touched"  # metadata moved (an mtime) but the content is the same


@dataclass(frozen=True)
class Change:
    """One document that is new, changed or gone since the cursor."""

    doc_id: str
    kind: ChangeKind
    version: str | None = None
    fingerprint: str | None = None
    principals: tuple[str, ...] = ()


@dataclass
class ChangePage:
    """A page of changes and the cursor to store once every change on it is committed."""

    changes: list[Change]
    cursor: Cursor | None = None
    unchanged: int = 0


@dataclass
class ConnectionCheck:
    ok: bool
    message: str
    details: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Connector(Protocol):
    """A source system: what changed since a cursor, and each document's content and readers.

    `known` is what the index holds for the source (doc id -> version), so sources that cannot
    report deletions themselves (a folder, an S3 prefix) find them by listing difference.
    """

    name: str

    def test_connection(self) -> ConnectionCheck: ...

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]: ...

    def fetch(self, change: Change) -> SourceDocument: ...


@runtime_checkable
class ChangesFor(Protocol):
    """An optional capability: what changed of the documents a notification named, decided by
    looking at each of them now. Without it, notified changes are read by `list_changes`."""

    def changes_for(
        self, doc_ids: Iterable[str], known: Mapping[str, KnownDocument]
    ) -> ChangePage: ...


def named_page(
    doc_ids: Iterable[str],
    known: Mapping[str, KnownDocument],
    look: Callable[[str], tuple[bool, Change | None]],
) -> ChangePage:
    """A page of changes for named documents. `look` says whether a document is there and, if
    so, its change as a listing would report it (None when unchanged); one that is not there is
    deleted if the index holds it, and ignored if not."""
    page = ChangePage(changes=[])
    for doc_id in dict.fromkeys(doc_ids):
        present, change = look(doc_id)
        if not present:
            if doc_id in known:
                page.changes.append(Change(doc_id, ChangeKind.DELETED))
        elif change is None:
            page.unchanged += 1
        else:
            page.changes.append(change)
    return page


def listing_pages(
    listing: Iterable[tuple[str, Change | None]],
    known: Mapping[str, KnownDocument],
    page_size: int,
) -> Iterator[ChangePage]:
    """Pages of changes for a source that can only list what it has (a folder, a bucket).

    `listing` gives every document id present with its change, or None when unchanged; what the
    index holds that the listing never named was deleted.
    """
    seen: set[str] = set()
    page = ChangePage(changes=[])

    def full() -> bool:
        return len(page.changes) >= page_size

    for doc_id, change in listing:
        seen.add(doc_id)
        if change is None:
            page.unchanged += 1
            continue
        page.changes.append(change)
        if full():
            yield page
            page = ChangePage(changes=[])
    for doc_id in sorted(set(known) - seen):
        page.changes.append(Change(doc_id, ChangeKind.DELETED))
        if full():
            yield page
            page = ChangePage(changes=[])
    if page.changes or page.unchanged:
        yield page


@dataclass(frozen=True)
class Retry:
    """A throttled or briefly unavailable source: try again, after `after` seconds if it said."""

    after: float | None = None


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds a `Retry-After` header asks for: a number, or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class Backoff:
    """How a connector waits out throttling (429/503): the server's Retry-After when it gives
    one, else exponential backoff with full jitter; never more than `cap_s` per wait and
    `attempts` tries, after which the run's own retry (a Prefect task retry) takes over."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, retry: Retry) -> float:
        if retry.after is not None:
            return min(retry.after, self.cap_s)
        return random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))

    def run(self, operation: Callable[[], T], classify: Callable[[Exception], Retry | None],
            describe: str = "the source") -> T:
        """`operation()`, retried while `classify` says its error is transient."""
        for attempt in range(self.attempts):
            try:
                return operation()
            except Exception as error:  # classified below; anything else propagates
                retry = classify(error)
                if retry is None:
                    raise
                if attempt == self.attempts - 1:
                    raise TransientError(
                        f"{describe} is still throttling or unavailable after "
                        f"{self.attempts} tries", repr(error)) from error
                self.sleep(self.delay(attempt, retry))
        raise AssertionError("unreachable")
