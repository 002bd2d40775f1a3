"""The state store: sources, sync runs, document versions, cursors, quarantine, embedding cache."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy import (
    JSON,
    DateTime,
    Integer,
    LargeBinary,
    String,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from headwater.coalesce import Coalescer

MIGRATIONS = Path(__file__).parent / "migrations"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(when: datetime) -> datetime:
    # Columns hold naive UTC, as utcnow() writes it; sources give aware times.
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


class Base(DeclarativeBase):
    pass


def _upsert(engine: Engine) -> Callable[..., Any]:
    """The INSERT that takes ON CONFLICT, of the store's two dialects (PostgreSQL, SQLite)."""
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


def _parts(items: list, size: int = 500) -> Iterator[list]:
    # IN lists of at most 500: SQLite's bound-parameter limit was 999 before 3.32.
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _update_documents(s: Session, source: str, column: str,
                      values: Iterable[tuple[str, object]]) -> None:
    """One column of many document rows, in one executemany (absent rows are left alone)."""
    table = DocumentRow.__table__
    params = [{"doc": doc_id, "value": value} for doc_id, value in values]
    if params:
        s.execute(update(table).where(table.c.source == source,
                                      table.c.doc_id == bindparam("doc"))
                  .values({column: bindparam("value")}), params)


class SourceRow(Base):
    __tablename__ = "sources"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(50))
    cursor: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    lock_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lock_expires: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # A fingerprint of the policy, chunking and model the indexed documents went through.
    processing: Mapped[str | None] = mapped_column(String(64), nullable=True)


class SyncRunRow(Base):
    __tablename__ = "sync_runs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source: Mapped[str] = mapped_column(String(200), index=True)
    flow_run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(20))
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)


@dataclass(frozen=True)
class SyncRun:
    id: str
    source: str
    flow_run_id: str | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    summary: dict


class DocumentRow(Base):
    __tablename__ = "documents"
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    version: Mapped[str] = mapped_column(String(200))
    fingerprint: Mapped[str | None] = mapped_column(String(200), nullable=True)
    title: Mapped[str] = mapped_column(Text, default="")
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    principals: Mapped[list | None] = mapped_column(JSON, nullable=True)
    indexed_at: Mapped[datetime] = mapped_column(DateTime)
    # "indexed", or "stale" while a newer version sits in quarantine (the old one is served).
    status: Mapped[str] = mapped_column(String(20), default="indexed")
    # public, internal, confidential or restricted: set by the compliance stage.
    classification: Mapped[str | None] = mapped_column(String(20), nullable=True)
    # The source's own modification time, which retention is judged by (None: not known).
    modified: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class SubjectRow(Base):
    """Where an identifier occurs, by its keyed hash only (the subject index)."""

    __tablename__ = "subjects"
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    subject: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    entity_type: Mapped[str] = mapped_column(String(50), primary_key=True)
    ordinals: Mapped[list] = mapped_column(JSON)


class SuppressionRow(Base):
    """An erased subject, by keyed hash: a sync never indexes what mentions it again."""

    __tablename__ = "suppressed_subjects"
    subject: Mapped[str] = mapped_column(String(64), primary_key=True)
    entity_type: Mapped[str] = mapped_column(String(50))
    scope: Mapped[str] = mapped_column(String(20))  # "chunks" or "document"
    request_id: Mapped[str] = mapped_column(String(64))
    suppressed_at: Mapped[datetime] = mapped_column(DateTime)


class PersistedAnswerRow(Base):
    """A document a persisted answer (an `answer-query` flow run's stored result) was built
    from: an erasure that touches the document withdraws the answer."""

    __tablename__ = "persisted_answers"
    flow_run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime)


class SubjectDocument(NamedTuple):
    """A document that holds one of the looked-up subjects: where, and as what."""

    source: str
    doc_id: str
    ordinals: list[int]
    types: list[str]


class QuarantineRow(Base):
    __tablename__ = "quarantine"
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    stage: Mapped[str] = mapped_column(String(50))
    reason: Mapped[str] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(String(200), nullable=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=1)


class PendingChangeRow(Base):
    """A document a change notification named, waiting for `ingest_changes` to index it."""

    __tablename__ = "pending_changes"
    source: Mapped[str] = mapped_column(String(200), primary_key=True)
    doc_id: Mapped[str] = mapped_column(String(1000), primary_key=True)
    token: Mapped[str] = mapped_column(String(32))
    noted_at: Mapped[datetime] = mapped_column(DateTime)


@dataclass(frozen=True)
class PendingChange:
    """One pending notification as a run read it; `token` tells it from a later one."""

    doc_id: str
    token: str
    noted_at: datetime


class EmbeddingRow(Base):
    __tablename__ = "embedding_cache"
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    text_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class AuditRow(Base):
    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    resource: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(50))
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    details: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(Base):
    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hash: Mapped[str] = mapped_column(String(64))


class FeedbackRow(Base):
    """A user's rating of one answer; the comment is the user's own words, kept only here."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    rating: Mapped[int] = mapped_column(Integer)  # +1 or -1
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)


class EvaluationRunRow(Base):
    """One variant's scores on one query set, per query too, so runs compare over time."""

    __tablename__ = "evaluation_runs"
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    variant: Mapped[str] = mapped_column(String(200), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, index=True)
    dataset: Mapped[str] = mapped_column(Text)
    dataset_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    per_query: Mapped[list] = mapped_column(JSON)


@dataclass(frozen=True)
class Feedback:
    id: int
    at: datetime
    request_id: str
    actor: str
    rating: int
    comment: str | None


@dataclass(frozen=True)
class EvaluationRun:
    run_id: str
    variant: str
    at: datetime
    dataset: str
    dataset_fingerprint: str
    config: dict
    metrics: dict
    per_query: list


# The hash the first entry names as its predecessor (migration 0003 starts the head with it).
AUDIT_GENESIS = "0" * 64


def audit_hash(prev_hash: str, at: datetime, actor: str, action: str, resource: str,
               outcome: str, request_id: str | None, details: dict | None) -> str:
    payload = json.dumps([prev_hash, at.isoformat(), actor, action, resource, outcome,
                          request_id, details], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class AuditVerdict:
    """Whether the audit chain is intact, and if not, the first entry that breaks it."""

    intact: bool
    checked: int
    broken_id: int | None
    reason: str


@dataclass(frozen=True)
class KnownDocument:
    """What the index holds of a document: enough to tell whether it changed."""

    doc_id: str
    version: str
    fingerprint: str | None
    chunk_count: int
    principals: list[str]
    quarantined: bool = False


@dataclass(frozen=True)
class QuarantinedDocument:
    source: str
    doc_id: str
    stage: str
    reason: str
    first_seen: datetime
    last_seen: datetime
    attempts: int


class SourceBusy(Exception):
    """Another run holds this source's sync lock."""

    def __init__(self, source: str, owner: str) -> None:
        super().__init__(f"source {source!r} is already being synced by {owner}")
        self.owner = owner


def migrate(url: str) -> None:
    """Bring the database to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    migrate(url)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _wal(connection: object, _: object) -> None:
        # WAL lets readers run beside the one writer, and commits need no full fsync each.
        cursor = connection.cursor()  # type: ignore[attr-defined]
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()
        # SQLAlchemy, not the driver, opens transactions (the driver would begin only at the
        # first write, after a transaction's reads).
        connection.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(engine, "begin")
    def _immediate(connection: Connection) -> None:
        # SQLite ignores SELECT ... FOR UPDATE: a transaction that reads then writes (the audit
        # chain's head, a source's lock) must hold the write lock from its start, or two
        # processes read the same head and fork the chain.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not Path(f"/proc/{pid}").exists()


class StateStore:
    """Headwater's bookkeeping, in SQLite by default or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as session, session.begin():
            yield session

    # -- sources, locks and cursors ---------------------------------------------------------

    def ensure_source(self, name: str, type_: str) -> None:
        with self.session() as s:
            if s.get(SourceRow, name) is None:
                s.add(SourceRow(name=name, type=type_))

    def acquire_lock(self, source: str, ttl: timedelta = timedelta(minutes=30)) -> str:
        """Take the source's sync lock, or raise SourceBusy naming the run that holds it."""
        owner = _this_process() + ":" + uuid.uuid4().hex[:8]
        now = utcnow()
        with self.session() as s:
            row = s.get(SourceRow, source)
            held = row.lock_owner if row else None
            if held and row.lock_expires and row.lock_expires > now:
                holder = held.rsplit(":", 1)[0]
                if not _owner_is_dead(holder):
                    raise SourceBusy(source, held)
            # A conditional update makes two racing takers see one winner.
            taken = s.execute(
                update(SourceRow)
                .where(SourceRow.name == source, SourceRow.lock_owner.is_not_distinct_from(held))
                .values(lock_owner=owner, lock_expires=now + ttl)
            ).rowcount
        if taken != 1:
            raise SourceBusy(source, "another run")
        return owner

    def renew_lock(self, source: str, owner: str,
                   ttl: timedelta = timedelta(minutes=30)) -> None:
        with self.session() as s:
            s.execute(update(SourceRow).where(SourceRow.name == source,
                                              SourceRow.lock_owner == owner)
                      .values(lock_expires=utcnow() + ttl))

    def release_lock(self, source: str, owner: str) -> None:
        with self.session() as s:
            s.execute(update(SourceRow).where(SourceRow.name == source,
                                              SourceRow.lock_owner == owner)
                      .values(lock_owner=None, lock_expires=None))

    def cursor(self, source: str) -> dict | None:
        with self.session() as s:
            row = s.get(SourceRow, source)
            return row.cursor if row else None

    def processing(self, source: str) -> str | None:
        with self.session() as s:
            row = s.get(SourceRow, source)
            return row.processing if row else None

    # -- runs --------------------------------------------------------------------------------

    def start_run(self, source: str, flow_run_id: str | None) -> str:
        run_id = str(uuid.uuid4())
        with self.session() as s:
            s.add(SyncRunRow(id=run_id, source=source, flow_run_id=flow_run_id,
                             started_at=utcnow(), status="running"))
        return run_id

    def finish_run(self, run_id: str, status: str, summary: dict,
                   processing: str | None = None, listed: bool = True) -> None:
        """End a run; only a completed run over the source's whole change listing (`listed`)
        counts as its last success and brings it to `processing`."""
        with self.session() as s:
            run = s.get(SyncRunRow, run_id)
            run.status, run.summary, run.finished_at = status, summary, utcnow()
            if status == "completed" and listed:
                source = s.get(SourceRow, run.source)
                source.last_success_at = run.finished_at
                # Only a completed run has brought every document to this processing.
                source.processing = processing or source.processing

    def finished_run(self, run_id: str | None = None, source: str | None = None) -> SyncRun | None:
        """One finished run (the newest, of a source if named), with its summary."""
        with self.session() as s:
            query = select(SyncRunRow).where(SyncRunRow.finished_at.is_not(None))
            if run_id:
                query = query.where(SyncRunRow.id == run_id)
            if source:
                query = query.where(SyncRunRow.source == source)
            row = s.execute(query.order_by(SyncRunRow.finished_at.desc()).limit(1)).scalar()
            if row is None:
                return None
            return SyncRun(row.id, row.source, row.flow_run_id, row.started_at,
                           row.finished_at, row.status, dict(row.summary or {}))

    # -- documents ---------------------------------------------------------------------------

    def known_documents(self, source: str) -> dict[str, KnownDocument]:
        """Indexed documents, plus quarantined ones never indexed (so their deletion is seen)."""
        with self.session() as s:
            rows = s.execute(select(DocumentRow).where(DocumentRow.source == source)).scalars()
            known = {
                r.doc_id: KnownDocument(r.doc_id, r.version, r.fingerprint, r.chunk_count,
                                        list(r.principals or []))
                for r in rows
            }
            held = s.execute(select(QuarantineRow.doc_id).where(QuarantineRow.source == source))
            for (doc_id,) in held:
                known.setdefault(doc_id, KnownDocument(doc_id, "", None, 0, [], quarantined=True))
            return known

    def document_count(self, source: str) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).where(DocumentRow.source == source)) or 0

    def document_details(self, keys: Iterable[tuple[str, str]]
                         ) -> dict[tuple[str, str], tuple[datetime | None, list[str]]]:
        """(source, doc id) -> the source's modification time and the readers, of the
        documents the state store knows among `keys`."""
        found: dict[tuple[str, str], tuple[datetime | None, list[str]]] = {}
        by_source: dict[str, list[str]] = {}
        for source, doc_id in set(keys):
            by_source.setdefault(source, []).append(doc_id)
        with self.session() as s:
            for source, doc_ids in by_source.items():
                for part in _parts(doc_ids):
                    rows = s.execute(select(DocumentRow.doc_id, DocumentRow.modified,
                                            DocumentRow.principals).where(
                        DocumentRow.source == source,
                        DocumentRow.doc_id.in_(part)))
                    found.update({(source, d): (m, list(p or [])) for d, m, p in rows})
        return found

    def document_status(self, source: str, doc_id: str) -> str | None:
        with self.session() as s:
            row = s.get(DocumentRow, (source, doc_id))
            return row.status if row else None

    def commit_batch(
        self,
        source: str,
        indexed: Iterable[tuple[str, str, str | None, str, int, list[str]]],
        deleted: Iterable[str],
        fingerprints: Iterable[tuple[str, str]] = (),
        cursor: dict | None = None,
        subjects: Mapping[str, Iterable[tuple[str, str, list[int]]]] | None = None,
        classifications: Mapping[str, str] | None = None,
        modified: Mapping[str, datetime] | None = None,
    ) -> None:
        """Record, in one transaction, what a batch wrote to the index, and the cursor after it.

        `indexed` holds (doc_id, version, fingerprint, title, chunk_count, principals).
        `subjects` replaces the subject index rows of each document it names with
        (subject hmac, entity type, chunk ordinals); deleted documents lose theirs.
        `modified` records source-side modification times (for retention), also of documents
        the batch did not index.
        """
        now = utcnow()
        classifications = classifications or {}
        modified = {d: _naive_utc(t) for d, t in (modified or {}).items()}
        rows: dict[str, dict] = {}
        for doc_id, version, fingerprint, title, chunks, principals in indexed:
            row = {"source": source, "doc_id": doc_id, "version": version,
                   "fingerprint": fingerprint, "title": title, "chunk_count": chunks,
                   "principals": principals, "indexed_at": now, "status": "indexed"}
            # A document whose readers alone changed keeps the classification it has.
            if doc_id in classifications:
                row["classification"] = classifications[doc_id]
            if doc_id in modified:
                row["modified"] = modified.pop(doc_id)
            rows[doc_id] = row
        # Statements per 500 documents, not per document: a batch's commit competes with the
        # embedder for the same cores (about 2 ms a document row by row on 2 cores).
        with self.session() as s:
            existing: set[str] = set()
            for part in _parts(list(rows)):
                existing.update(s.scalars(select(DocumentRow.doc_id).where(
                    DocumentRow.source == source, DocumentRow.doc_id.in_(part))))
                s.execute(delete(QuarantineRow).where(QuarantineRow.source == source,
                                                      QuarantineRow.doc_id.in_(part)))
            # Keys a row leaves out (classification, modified) keep their stored values.
            if new := [r for d, r in rows.items() if d not in existing]:
                s.execute(insert(DocumentRow), new)
            if known := [r for d, r in rows.items() if d in existing]:
                s.execute(update(DocumentRow), known)
            _update_documents(s, source, "modified", modified.items())
            for part in _parts(list(subjects or {})):
                s.execute(delete(SubjectRow).where(SubjectRow.source == source,
                                                   SubjectRow.doc_id.in_(part)))
            if occurrences := [{"source": source, "doc_id": doc_id, "subject": subject,
                                "entity_type": kind, "ordinals": list(ordinals)}
                               for doc_id, found in (subjects or {}).items()
                               for subject, kind, ordinals in found]:
                s.execute(insert(SubjectRow), occurrences)
            for part in _parts(list(deleted)):
                s.execute(delete(DocumentRow).where(DocumentRow.source == source,
                                                    DocumentRow.doc_id.in_(part)))
                s.execute(delete(QuarantineRow).where(QuarantineRow.source == source,
                                                      QuarantineRow.doc_id.in_(part)))
                s.execute(delete(SubjectRow).where(SubjectRow.source == source,
                                                   SubjectRow.doc_id.in_(part)))
            _update_documents(s, source, "fingerprint", fingerprints)
            if cursor is not None:
                s.get(SourceRow, source).cursor = cursor

    # -- subject index -----------------------------------------------------------------------

    def documents_for_subjects(self, hmacs: Iterable[str]) -> list[SubjectDocument]:
        """Every document holding any of these subjects (keyed hashes from `subject_hmac`),
        with the chunk ordinals and entity types they occur as."""
        wanted = sorted(set(hmacs))
        found: dict[tuple[str, str], tuple[set[int], set[str]]] = {}
        with self.session() as s:
            for part in _parts(wanted):
                rows = s.execute(select(SubjectRow).where(
                    SubjectRow.subject.in_(part))).scalars()
                for row in rows:
                    ordinals, types = found.setdefault((row.source, row.doc_id), (set(), set()))
                    ordinals.update(row.ordinals or [])
                    types.add(row.entity_type)
        return [SubjectDocument(source, doc_id, sorted(o), sorted(t))
                for (source, doc_id), (o, t) in sorted(found.items())]

    def document_classification(self, source: str, doc_id: str) -> str | None:
        with self.session() as s:
            row = s.get(DocumentRow, (source, doc_id))
            return row.classification if row else None

    # -- data-subject requests and retention --------------------------------------------------

    def suppress_subjects(self, subjects: Iterable[tuple[str, str]], scope: str,
                          request_id: str) -> None:
        """Put (subject hmac, entity type) on the suppression list; a wider scope wins."""
        now = utcnow()
        with self.session() as s:
            for subject, kind in subjects:
                row = s.get(SuppressionRow, subject)
                if row is None:
                    s.add(SuppressionRow(subject=subject, entity_type=kind, scope=scope,
                                         request_id=request_id, suppressed_at=now))
                elif scope == "document":
                    row.scope, row.request_id, row.suppressed_at = scope, request_id, now

    def suppressed_subjects(self) -> dict[str, str]:
        """Every suppressed subject hmac -> its scope ("chunks" or "document")."""
        with self.session() as s:
            return dict(s.execute(select(SuppressionRow.subject, SuppressionRow.scope)).all())

    def forget_chunks(self, source: str, erased: Mapping[str, Iterable[int]],
                      subjects: Iterable[str]) -> int:
        """The subject index after chunks left the index: the erased subjects' rows go
        everywhere, and other subjects no longer point at the erased chunks of `erased`
        (doc id -> ordinals); a row left pointing at nothing goes. Returns rows removed."""
        gone = sorted(set(subjects))
        removed = 0
        with self.session() as s:
            for part in _parts(gone):
                removed += s.execute(delete(SubjectRow).where(
                    SubjectRow.subject.in_(part))).rowcount
            for doc_id, ordinals in erased.items():
                drop = set(ordinals)
                rows = s.execute(select(SubjectRow).where(SubjectRow.source == source,
                                                          SubjectRow.doc_id == doc_id)).scalars()
                for row in list(rows):
                    left = sorted(set(row.ordinals or []) - drop)
                    if not left:
                        s.delete(row)
                        removed += 1
                    elif len(left) != len(row.ordinals or []):
                        row.ordinals = left
        return removed

    def forget_vectors(self, text_hashes: Iterable[str]) -> int:
        """Remove cached vectors of these texts (of every model); returns how many."""
        hashes = sorted(set(text_hashes))
        removed = 0
        with self.session() as s:
            for part in _parts(hashes):
                removed += s.execute(delete(EmbeddingRow).where(
                    EmbeddingRow.text_hash.in_(part))).rowcount
        return removed

    def mark_for_reread(self, source: str, doc_ids: Iterable[str]) -> None:
        """Make the next sync fetch these documents again, whatever their version says."""
        wanted = sorted(set(doc_ids))
        with self.session() as s:
            for part in _parts(wanted):
                s.execute(update(DocumentRow).where(
                    DocumentRow.source == source,
                    DocumentRow.doc_id.in_(part),
                ).values(version="", fingerprint=None))

    def expired_documents(self, source: str, before: datetime) -> list[str]:
        """Documents of a source last modified (at the source) before `before`; documents
        whose modification time is not known are never judged expired."""
        with self.session() as s:
            return list(s.execute(select(DocumentRow.doc_id).where(
                DocumentRow.source == source, DocumentRow.modified.is_not(None),
                DocumentRow.modified < _naive_utc(before)).order_by(DocumentRow.doc_id)
            ).scalars())

    # -- persisted answers -------------------------------------------------------------------

    def record_persisted_answer(self, flow_run_id: str,
                                documents: Iterable[tuple[str, str]]) -> None:
        """Note the documents (source, doc id) a stored answer was built from."""
        now = utcnow()
        with self.session() as s:
            for source, doc_id in sorted(set(documents)):
                s.merge(PersistedAnswerRow(flow_run_id=flow_run_id, source=source,
                                           doc_id=doc_id, at=now))

    def answers_from(self, source: str, doc_ids: Iterable[str]) -> list[str]:
        """The flow runs whose stored answers were built from any of these documents."""
        wanted = sorted(set(doc_ids))
        found: set[str] = set()
        with self.session() as s:
            for part in _parts(wanted):
                found |= set(s.execute(select(PersistedAnswerRow.flow_run_id).where(
                    PersistedAnswerRow.source == source,
                    PersistedAnswerRow.doc_id.in_(part))).scalars())
        return sorted(found)

    def forget_persisted_answer(self, flow_run_id: str) -> None:
        with self.session() as s:
            s.execute(delete(PersistedAnswerRow).where(
                PersistedAnswerRow.flow_run_id == flow_run_id))

    # -- quarantine --------------------------------------------------------------------------

    def quarantine(self, source: str, doc_id: str, stage: str, reason: str,
                   version: str | None) -> None:
        now = utcnow()
        with self.session() as s:
            row = s.get(QuarantineRow, (source, doc_id))
            if row is None:
                s.add(QuarantineRow(source=source, doc_id=doc_id, stage=stage, reason=reason,
                                    version=version, first_seen=now, last_seen=now, attempts=1))
            else:
                row.stage, row.reason, row.version, row.last_seen = stage, reason, version, now
                row.attempts += 1
            s.execute(update(DocumentRow)
                      .where(DocumentRow.source == source, DocumentRow.doc_id == doc_id)
                      .values(status="stale"))

    def quarantined(self, source: str | None = None) -> list[QuarantinedDocument]:
        with self.session() as s:
            query = select(QuarantineRow).order_by(QuarantineRow.source, QuarantineRow.doc_id)
            if source:
                query = query.where(QuarantineRow.source == source)
            return [
                QuarantinedDocument(r.source, r.doc_id, r.stage, r.reason, r.first_seen,
                                    r.last_seen, r.attempts)
                for r in s.execute(query).scalars()
            ]

    # -- audit trail -------------------------------------------------------------------------

    def append_audit(self, actor: str, action: str, resource: str, outcome: str,
                     request_id: str | None = None, details: dict | None = None) -> str:
        """Append an entry chained to the previous one by hash; returns the entry's hash."""
        return self.append_audit_entries([(actor, action, resource, outcome, request_id,
                                           details)])[0]

    def append_audit_entries(
        self, entries: list[tuple[str, str, str, str, str | None, dict | None]]
    ) -> list[str]:
        """Append several entries in one transaction, chained in order."""
        at = utcnow()
        hashes = []
        with self.session() as s:
            head = s.execute(select(AuditHeadRow).where(AuditHeadRow.id == 1)
                             .with_for_update()).scalar_one()
            previous = head.hash
            for actor, action, resource, outcome, request_id, details in entries:
                digest = audit_hash(previous, at, actor, action, resource, outcome, request_id,
                                    details)
                s.add(AuditRow(at=at, actor=actor, action=action, resource=resource,
                               outcome=outcome, request_id=request_id, details=details,
                               prev_hash=previous, hash=digest))
                hashes.append(digest)
                previous = digest
            head.hash = previous
        return hashes

    def iter_audit(self, since_id: int = 0, page: int = 1000) -> Iterator[AuditRow]:
        """Every audit entry in chain order, read a page at a time (the log only grows)."""
        last = since_id
        while True:
            with self.session() as s:
                rows = list(s.execute(select(AuditRow).where(AuditRow.id > last)
                                      .order_by(AuditRow.id).limit(page)).scalars())
                s.expunge_all()
            if not rows:
                return
            yield from rows
            last = rows[-1].id

    def verify_audit(self) -> AuditVerdict:
        """Recompute the chain: every entry must name its predecessor's hash and hash to its
        own, and the head must be the last entry, so an edited, removed or appended-around
        entry is found; the first one that breaks the chain is named."""
        with self.session() as s:
            head = s.execute(select(AuditHeadRow.hash).where(AuditHeadRow.id == 1)).scalar_one()
        previous, checked, last_id = AUDIT_GENESIS, 0, None
        for row in self.iter_audit():
            if row.prev_hash != previous:
                return AuditVerdict(False, checked, row.id,
                                    "it does not follow the entry before it (an entry before it "
                                    "was changed or removed)")
            expected = audit_hash(row.prev_hash, row.at, row.actor, row.action, row.resource,
                                  row.outcome, row.request_id, row.details)
            if expected != row.hash:
                return AuditVerdict(False, checked, row.id,
                                    "its contents do not match its hash (it was changed)")
            previous, checked, last_id = row.hash, checked + 1, row.id
        if head != previous:
            return AuditVerdict(False, checked, last_id,
                                "the chain ends before the recorded head (entries after it "
                                "were removed)")
        return AuditVerdict(True, checked, None, "")

    def latest_audit(self, limit: int = 50, before_id: int | None = None) -> list[AuditRow]:
        """A page of the audit trail, newest first; `before_id` continues an earlier page."""
        with self.session() as s:
            query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if before_id is not None:
                query = query.where(AuditRow.id < before_id)
            rows = list(s.execute(query).scalars())
            s.expunge_all()
            return rows

    def audit_entries(self, action: str | None = None) -> list[AuditRow]:
        with self.session() as s:
            query = select(AuditRow).order_by(AuditRow.id)
            if action:
                query = query.where(AuditRow.action == action)
            rows = list(s.execute(query).scalars())
            s.expunge_all()
            return rows

    # -- pending change notifications --------------------------------------------------------

    def note_changes(self, source: str, doc_ids: Iterable[str]) -> int:
        """Record documents a notification named (one row per document, however often it is
        named); a document named again gets a new token. Returns how many were recorded."""
        wanted = sorted(set(doc_ids))
        if not wanted:
            return 0
        now = utcnow()
        with self.session() as s:
            for part in _parts(wanted):
                rows = [{"source": source, "doc_id": d, "token": uuid.uuid4().hex,
                         "noted_at": now} for d in part]
                statement = _upsert(self.engine)(PendingChangeRow).values(rows)
                s.execute(statement.on_conflict_do_update(
                    index_elements=["source", "doc_id"],
                    set_={"token": statement.excluded.token,
                          "noted_at": statement.excluded.noted_at}))
        return len(wanted)

    def pending_changes(self, source: str) -> list[PendingChange]:
        with self.session() as s:
            rows = s.execute(select(PendingChangeRow).where(PendingChangeRow.source == source)
                             .order_by(PendingChangeRow.noted_at, PendingChangeRow.doc_id))
            return [PendingChange(r.doc_id, r.token, r.noted_at) for r in rows.scalars()]

    def clear_changes(self, source: str, read: Iterable[PendingChange]) -> int:
        """Remove the notifications a run has indexed: only as it read them, so one that came
        in meanwhile (a new token) stays for the next run. Returns how many went."""
        removed = 0
        with self.session() as s:
            for change in read:
                removed += s.execute(delete(PendingChangeRow).where(
                    PendingChangeRow.source == source, PendingChangeRow.doc_id == change.doc_id,
                    PendingChangeRow.token == change.token)).rowcount
        return removed

    # -- embedding cache ---------------------------------------------------------------------

    def cached_vectors(self, model: str, hashes: list[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        with self.session() as s:
            for part in _parts(hashes):
                rows = s.execute(select(EmbeddingRow.text_hash, EmbeddingRow.vector).where(
                    EmbeddingRow.model == model, EmbeddingRow.text_hash.in_(part)))
                found.update({h: v for h, v in rows})
        return found

    def store_vectors(self, model: str, vectors: dict[str, bytes]) -> None:
        rows = [{"model": model, "text_hash": h, "vector": v} for h, v in vectors.items()]
        if not rows:
            return
        with self.session() as s:
            # Another source's sync may have stored the same text since it was looked up.
            s.execute(_upsert(self.engine)(EmbeddingRow).on_conflict_do_nothing(), rows)

    # -- answer feedback and retrieval evaluations -------------------------------------------

    def asker(self, request_id: str) -> str | None:
        """Who asked the question answered under this request id (its audit actor), if any."""
        with self.session() as s:
            return s.execute(select(AuditRow.actor).where(
                AuditRow.request_id == request_id, AuditRow.action == "query")
                .order_by(AuditRow.id).limit(1)).scalar()

    def record_feedback(self, request_id: str, actor: str, rating: int,
                        comment: str | None) -> int:
        with self.session() as s:
            row = FeedbackRow(at=utcnow(), request_id=request_id, actor=actor, rating=rating,
                              comment=comment)
            s.add(row)
            s.flush()
            return row.id

    def feedback_since(self, since: datetime) -> list[Feedback]:
        with self.session() as s:
            rows = s.execute(select(FeedbackRow).where(FeedbackRow.at >= since)
                             .order_by(FeedbackRow.id)).scalars()
            return [Feedback(r.id, r.at, r.request_id, r.actor, r.rating, r.comment)
                    for r in rows]

    def audit_since(self, action: str, since: datetime) -> list[AuditRow]:
        with self.session() as s:
            rows = list(s.execute(select(AuditRow).where(AuditRow.action == action,
                                                         AuditRow.at >= since)
                                  .order_by(AuditRow.id)).scalars())
            s.expunge_all()
            return rows

    def record_evaluation(self, run_id: str, variant: str, dataset: str, fingerprint: str,
                          config: dict, metrics: dict, per_query: list) -> None:
        with self.session() as s:
            s.add(EvaluationRunRow(run_id=run_id, variant=variant, at=utcnow(), dataset=dataset,
                                   dataset_fingerprint=fingerprint, config=config,
                                   metrics=metrics, per_query=per_query))

    def evaluation_runs(self, fingerprint: str | None = None, variant: str | None = None,
                        limit: int = 50) -> list[EvaluationRun]:
        """Stored evaluations, newest first: a trend of one variant on one query set."""
        with self.session() as s:
            query = select(EvaluationRunRow)
            if fingerprint:
                query = query.where(EvaluationRunRow.dataset_fingerprint == fingerprint)
            if variant:
                query = query.where(EvaluationRunRow.variant == variant)
            rows = s.execute(query.order_by(EvaluationRunRow.at.desc()).limit(limit)).scalars()
            return [EvaluationRun(r.run_id, r.variant, r.at, r.dataset, r.dataset_fingerprint,
                                  dict(r.config), dict(r.metrics), list(r.per_query))
                    for r in rows]



class AuditWriter:
    """The audit trail for a busy process: concurrent entries share one transaction.

    `append_audit` returns once its entry is committed, so nothing answered goes unrecorded,
    but requests never queue on the database's write lock one by one.
    """

    def __init__(self, store: StateStore) -> None:
        self._calls: Coalescer[tuple, str] = Coalescer(store.append_audit_entries,
                                                       "audit-writer", max_batch=500)

    def append_audit(self, actor: str, action: str, resource: str, outcome: str,
                     request_id: str | None = None, details: dict | None = None) -> str:
        return self._calls.submit((actor, action, resource, outcome, request_id, details))

    def close(self) -> None:
        self._calls.close()
