"""The stages of a sync, one batch at a time: fetch, parse, redact, chunk, embed, index, commit."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from weaviate.classes.query import Filter
from weaviate.exceptions import UnexpectedStatusCodeError, WeaviateBaseError

from connectors import open_connector
from connectors.base import Change, ChangeKind, ChangePage, Connector
from headwater.config import SourceConfig, source_config
from headwater.errors import ComplianceError, IndexWriteError, QualityGateFailed, SourceError
from headwater.logs import (
    bind_contextvars,
    bound_contextvars,
    configure_process_logging,
    get_logger,
    unbind_contextvars,
)
from headwater.records import Chunk, SourceDocument
from headwater.settings import Settings
from headwater.state import KnownDocument, StateStore
from tasks import chunk as chunking
from tasks import compliance, quality
from tasks.embed import embed_texts, load_embedder, load_model, model_path
from tasks.embedding_backends import model_digest
from tasks.index import connect_index, delete_where, ensure_collection, upsert_chunks
from tasks.parse import DocumentRejected, ParsedDocument, parse_document

SYNC_ACTOR = "system:sync"
log = get_logger(__name__)
STAGES = ("list", "fetch", "parse", "validate", "compliance", "chunk", "embed", "index",
          "commit")


@dataclass
class Rejection:
    doc_id: str
    stage: str
    reason: str
    version: str | None


@dataclass
class SyncContext:
    """Everything a run's stages share: the source, its connector, state and index names."""

    settings: Settings
    source: SourceConfig
    connector: Connector
    store: StateStore
    collection: str
    run_id: str
    lock_owner: str
    known: dict[str, KnownDocument]
    full: bool = False
    quality: quality.QualityLedger = field(default_factory=quality.QualityLedger)
    policy: compliance.Policy | None = None
    processing: str | None = None
    reread: str = ""  # why a run the caller did not ask to be full became one
    borrowed_lock: bool = False  # the caller (a reindex) holds the source's lock and frees it
    # False for a run over notified changes only: it proves nothing about the rest of the
    # source (deletions, other edits), so it is not the source's "last successful sync".
    listing: bool = True
    # True in a copy unpickled in another process (a Dask worker).
    travelled: bool = field(default=False, init=False, repr=False)

    @property
    def run_name(self) -> str:
        return f"{self.source.name}-{self.run_id}"

    def for_batch(self, batch: Batch) -> SyncContext:
        """A copy to send with one batch to another process: of the documents known, only the
        batch's own, the only ones its stages look up."""
        ids = {c.doc_id for c in batch.changes}
        return replace(self, known={d: self.known[d] for d in ids if d in self.known})

    def __getstate__(self) -> dict[str, Any]:
        # What crosses to a worker is names, settings and known documents; the live objects
        # (connector, state store) are opened again there, the store's engine once per process.
        return {k: v for k, v in self.__dict__.items()
                if k not in ("connector", "store", "quality")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.travelled = True
        # A Dask worker's lines are formatted like the flow's (JSON in production).
        configure_process_logging()
        self.connector = _ReopenedConnector(self.source)  # type: ignore[assignment]
        self.store = StateStore(self.settings.resolved_state_db_url)
        # This copy's findings go back to the flow with the batch (Batch.verdicts).
        self.quality = quality.QualityLedger()


class _ReopenedConnector:
    """A worker's connector, opened at its first use: workers embed and write, and rarely
    read the source (whose credentials they may not even have)."""

    def __init__(self, config: SourceConfig) -> None:
        self._config, self._connector = config, None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pickle and copy probe private names before __init__ ran
            raise AttributeError(name)
        if self._connector is None:
            self._connector = open_connector(self._config)
        return getattr(self._connector, name)


@dataclass
class Batch:
    """One page of changes as it moves through the stages."""

    changes: list[Change]
    cursor: dict | None = None
    unchanged: int = 0
    documents: list[SourceDocument] = field(default_factory=list)
    parsed: list[ParsedDocument] = field(default_factory=list)
    chunks: dict[str, list[Chunk]] = field(default_factory=dict)
    findings: dict[str, compliance.DocumentFindings] = field(default_factory=dict)
    vectors: Any = None
    rejected: list[Rejection] = field(default_factory=list)
    embedded: int = 0
    chunks_written: int = 0
    chunks_deleted: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # Ordinals of chunks not indexed because they mention an erased (suppressed) subject.
    withheld: dict[str, list[int]] = field(default_factory=dict)
    # Documents past the source's retention, with their source-side modification time.
    expired: dict[str, datetime] = field(default_factory=dict)
    # Chunks-suite findings made in another process, for the run's ledger in the flow's.
    verdicts: list[quality.Verdict] = field(default_factory=list)
    embedded_by: tuple[str, str] = ("", "")  # the model and the backend of `vectors`

    def of_kind(self, *kinds: ChangeKind) -> list[Change]:
        return [c for c in self.changes if c.kind in kinds]

    def span(self, doc_id: str) -> int:
        """How many chunks a document has, withheld ones included: ordinals keep their places,
        so a withheld chunk leaves a gap rather than renumbering the ones after it."""
        ordinals = [c.ordinal for c in self.chunks.get(doc_id, [])]
        return max([*ordinals, *self.withheld.get(doc_id, [])], default=-1) + 1


@dataclass
class SyncSummary:
    """What a run did, in the words of the artifact and the CLI."""

    source: str
    status: str = "running"
    kind: str = "sync"  # or "changes": only the documents change notifications named
    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    permissions: int = 0
    quarantined: int = 0
    expired: int = 0  # past the source's retention: skipped, not quarantined
    chunks_written: int = 0
    chunks_deleted: int = 0
    suppressed: int = 0  # chunks withheld because they mention an erased subject
    embedded: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    message: str = ""
    quality: list[dict[str, Any]] = field(default_factory=list)
    data_docs: str = ""

    def add(self, batch: Batch) -> None:
        rejected = {r.doc_id for r in batch.rejected}
        for change in batch.changes:
            if change.doc_id in rejected or change.doc_id in batch.expired:
                continue
            if change.kind is ChangeKind.ADDED:
                self.new += 1
            elif change.kind is ChangeKind.MODIFIED:
                self.changed += 1
            elif change.kind is ChangeKind.DELETED:
                self.deleted += 1
            elif change.kind is ChangeKind.PERMISSIONS:
                self.permissions += 1
            else:
                self.unchanged += 1
        self.unchanged += batch.unchanged
        self.quarantined += len(rejected)
        self.expired += len(batch.expired)
        self.suppressed += sum(map(len, batch.withheld.values()))
        self.chunks_written += batch.chunks_written
        self.chunks_deleted += batch.chunks_deleted
        self.embedded += batch.embedded
        for stage, seconds in batch.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in {
            **self.__dict__, "seconds": {s: round(t, 3) for s, t in self.seconds.items()},
        }.items()}


@dataclass
class HeldDeletions:
    """Deletions wait until the listing is complete, so the mass-delete guard sees them all.

    A source's cursor must not move past a deletion that is not applied yet: from the first held
    deletion on, cursors are held too, and the newest is committed with the last deletion.
    """

    changes: list[Change] = field(default_factory=list)
    cursor: dict | None = None

    def hold(self, batch: Batch) -> Batch:
        gone = batch.of_kind(ChangeKind.DELETED)
        if gone or self.changes:
            self.changes += gone
            batch.changes = [c for c in batch.changes if c.kind is not ChangeKind.DELETED]
            if batch.cursor is not None:
                self.cursor, batch.cursor = batch.cursor, None
        return batch

    def batches(self, size: int) -> Iterator[Batch]:
        for start in range(0, len(self.changes), size):
            last = start + size >= len(self.changes)
            yield Batch(self.changes[start : start + size], self.cursor if last else None)

    def __len__(self) -> int:
        return len(self.changes)


@contextmanager
def _timed(batch: Batch, stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        batch.seconds[stage] = batch.seconds.get(stage, 0.0) + time.perf_counter() - started


# -- opening and closing a run ---------------------------------------------------------------


def open_sync(settings: Settings, source: str, full: bool, flow_run_id: str | None = None,
              collection: str | None = None, lock_owner: str | None = None,
              listing: bool = True) -> SyncContext:
    """Take the source's lock and record the run; raises SourceBusy if another run holds it.

    A reindex names the collection to write (not the alias) and the lock it already holds.
    """
    config = source_config(settings.config, source)
    # A policy that cannot run (no key, unknown framework) stops the run before it starts.
    policy = compliance.load_policy(config, settings)
    connector = open_connector(config)
    store = StateStore(settings.resolved_state_db_url)
    store.ensure_source(config.name, config.type)
    owner = lock_owner or store.acquire_lock(config.name)
    collection = collection or settings.collection
    try:
        check = connector.test_connection()
        if not check.ok:
            raise SourceError(f"source {source!r}: {check.message}")
        with connect_index(settings) as client:
            ensure_collection(client, collection)
        # Once per process, before the clock of any stage starts.
        load_model(settings.embedding_model)
        # An ONNX or OpenVINO export happens here at first use, and a refused backend stops
        # the run before it starts.
        load_embedder(settings.embedding_model, settings.embedding_backend, settings.cache_dir)
        quality.quality_gate(str(data_docs_dir(settings)))
        known = store.known_documents(config.name)
        processing = processing_fingerprint(settings, config, policy)
        previous = store.processing(config.name)
        if known and previous is not None and previous != processing:
            # What is indexed went through another policy, chunking or model: read it all again
            # (the embedding cache still spares unchanged text).
            full, reread = True, ("full re-read: the source's policy, chunking or embedding "
                                  "model changed since its documents were indexed")
        else:
            reread = ""
        if full:
            # A full sync re-reads everything but still finds deletions by difference.
            known = {k: KnownDocument(k, "", None, d.chunk_count, d.principals)
                     for k, d in known.items()}
        run_id = store.start_run(config.name, flow_run_id)
    except BaseException:
        if lock_owner is None:
            store.release_lock(config.name, owner)
        raise
    # Every later line of the run, in nested calls and submitted tasks too, carries its ids:
    # run_id is the audit trail's, flow_run_id the Prefect UI's.
    bind_contextvars(run_id=run_id, flow_run_id=flow_run_id, source=config.name)
    log.info("sync started", full=full, reread=reread or None)
    return SyncContext(settings, config, connector, store, collection, run_id, owner,
                       known, full, policy=policy, processing=processing, reread=reread,
                       borrowed_lock=lock_owner is not None, listing=listing)


def processing_fingerprint(settings: Settings, config: SourceConfig,
                           policy: compliance.Policy | None) -> str:
    """What decides the indexed text and vectors besides the source itself."""
    # The model by name and by its files' hash: another model needs a reindex. The backend
    # is left out on purpose: backends within the accuracy guard give interchangeable vectors.
    facts: dict[str, Any] = {"model": [settings.embedding_model,
                                       model_digest(model_path(settings.embedding_model))],
                             "chunk": [settings.chunk_tokens, settings.chunk_overlap]}
    if policy is not None:
        key_check = hmac.new(policy.subject_key.get_secret_value().encode(), b"headwater",
                             hashlib.sha256).hexdigest()[:16]  # the key changes hashed values
        facts["policy"] = [policy.actions, policy.classification, policy.custom_levels,
                           list(policy.recognizers), policy.min_score, key_check]
        if policy.disabled:  # only when set, so fingerprints from before the option hold
            facts["policy"].append(list(policy.disabled))
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def list_pages(ctx: SyncContext) -> Iterator[Batch]:
    """The source's changes, streamed page by page (never the whole listing in memory)."""
    pages = ctx.connector.list_changes(None if ctx.full else ctx.store.cursor(ctx.source.name),
                                       ctx.known)
    while True:
        started = time.perf_counter()
        page: ChangePage | None = next(pages, None)
        if page is None:
            return
        batch = Batch(page.changes, page.cursor, page.unchanged)
        batch.seconds["list"] = time.perf_counter() - started
        yield batch


def data_docs_dir(settings: Settings) -> Path:
    return settings.data_dir / "quality" / "data-docs"


def close_sync(ctx: SyncContext, summary: SyncSummary, status: str, message: str = "") -> dict:
    summary.status = status
    summary.kind = "sync" if ctx.listing else "changes"
    expired = (f"{summary.expired} documents last modified more than "
               f"{ctx.source.retention.days} days ago were not indexed (the source's "
               "retention)" if summary.expired and ctx.source.retention else "")
    summary.message = "; ".join(m for m in (ctx.reread, expired, message) if m)
    summary.quality = ctx.quality.rows()
    # The run's decision, in the audit trail beside the queries it will serve.
    ctx.store.append_audit(SYNC_ACTOR, f"ingest.{summary.kind}", f"source:{ctx.source.name}",
                           status,
                           ctx.run_id, {k: v for k, v in summary.as_dict().items()
                                        if isinstance(v, int) or k == "message"})
    if ctx.quality.result_ids:
        gate = quality.quality_gate(str(data_docs_dir(ctx.settings)))
        summary.data_docs = str(gate.build_docs(ctx.quality.result_ids))
    result = summary.as_dict()
    ctx.store.finish_run(ctx.run_id, status, result, ctx.processing, listed=ctx.listing)
    if not ctx.borrowed_lock:
        ctx.store.release_lock(ctx.source.name, ctx.lock_owner)
    (log.info if status == "completed" else log.error)(
        "sync finished", status=status, message=summary.message or None,
        **{k: v for k, v in result.items() if isinstance(v, int)})
    unbind_contextvars("run_id", "flow_run_id", "source")
    return result


# -- the stages --------------------------------------------------------------------------------


def retention_cutoff(source: SourceConfig, now: datetime | None = None) -> datetime | None:
    """Documents last modified before this are past the source's retention (None: kept)."""
    if source.retention is None:
        return None
    return (now or datetime.now(UTC)) - timedelta(days=source.retention.days)


def fetch_documents(ctx: SyncContext, batch: Batch) -> Batch:
    with _timed(batch, "fetch"):
        cutoff = retention_cutoff(ctx.source)
        for change in batch.of_kind(ChangeKind.ADDED, ChangeKind.MODIFIED):
            try:
                with bound_contextvars(doc_id=change.doc_id):
                    document = ctx.connector.fetch(change)
            except DocumentRejected as rejected:
                batch.rejected.append(Rejection(change.doc_id, rejected.stage, rejected.reason,
                                                change.version))
                continue
            modified = document.modified
            if cutoff and modified and modified.astimezone(UTC) < cutoff:
                # Not an error: the retention purge removes what the index still holds of it.
                batch.expired[document.doc_id] = modified
                continue
            batch.documents.append(document)
    return batch


def parse_documents(ctx: SyncContext, batch: Batch) -> Batch:
    with _timed(batch, "parse"):
        for document in batch.documents:
            try:
                with bound_contextvars(doc_id=document.doc_id):
                    batch.parsed.append(parse_document(document))
            except DocumentRejected as rejected:
                batch.rejected.append(Rejection(document.doc_id, rejected.stage, rejected.reason,
                                                document.version))
        # Bytes are not needed past this point; let them go before embedding.
        batch.documents = []
    return batch


def _check_failed_share(ctx: SyncContext, batch: Batch) -> None:
    """Stop the run before this batch is written if too many of its documents failed."""
    limits = ctx.source.quality
    attempted = len(batch.of_kind(ChangeKind.ADDED, ChangeKind.MODIFIED))
    # A compliance analyzer that died says nothing about the source's documents.
    failed = sum(1 for r in batch.rejected if r.stage != "compliance")
    if attempted >= limits.min_batch_for_failed_share and failed / attempted > (
            limits.max_failed_share):
        reasons = Counter(r.reason.split(":")[0] for r in batch.rejected).most_common(3)
        raise QualityGateFailed(
            f"{failed} of {attempted} documents in a batch failed "
            f"({failed / attempted:.0%}, the limit is {limits.max_failed_share:.0%}); nothing "
            f"of it was written. Most common: " + "; ".join(f"{r} ({n})" for r, n in reasons),
        )


def _reject(batch: Batch, reasons: dict[str, str]) -> None:
    """Take documents out of the batch, with their chunks and vectors, into quarantine."""
    if not reasons:
        return
    versions = {p.document.doc_id: p.document.version for p in batch.parsed}
    batch.rejected += [Rejection(d, "quality", r, versions.get(d)) for d, r in reasons.items()]
    batch.parsed = [p for p in batch.parsed if p.document.doc_id not in reasons]
    if batch.chunks:
        keep = np.array([doc_id not in reasons for doc_id, chunks in batch.chunks.items()
                         for _ in chunks], dtype=bool)
        if batch.vectors is not None and len(keep):
            batch.vectors = np.asarray(batch.vectors)[keep]
        batch.chunks = {d: c for d, c in batch.chunks.items() if d not in reasons}


def validate_documents(ctx: SyncContext, batch: Batch) -> Batch:
    """The documents suite: failing documents are quarantined, too many stop the run."""
    with _timed(batch, "validate"):
        limits = ctx.source.quality
        verdict = quality.quality_gate(str(data_docs_dir(ctx.settings))).validate(
            "documents", quality.documents_frame(batch.parsed), {
                "min_document_chars": limits.min_document_chars,
                "max_document_chars": limits.max_document_chars,
                "min_printable_ratio": limits.min_printable_ratio,
            }, ctx.run_name)
        ctx.quality.record(verdict)
        _reject(batch, verdict.rejected())
    _check_failed_share(ctx, batch)
    return batch


def validate_chunks(ctx: SyncContext, batch: Batch) -> Batch:
    """The chunks suite, on text and vectors just before they are written."""
    with _timed(batch, "validate"):
        chunks = [c for doc_chunks in batch.chunks.values() for c in doc_chunks]
        model = load_model(ctx.settings.embedding_model)
        # With a policy, what it removes must be gone by now; without one there is no promise.
        removed = compliance.removed_entities(ctx.source)
        residual = quality.residual_pii_scores([c.text for c in chunks], removed) if (
            removed) else None
        verdict = quality.quality_gate(str(data_docs_dir(ctx.settings))).validate(
            "chunks", quality.chunks_frame(chunks, batch.vectors, residual), {
                "max_chunk_tokens": model.max_seq_length - 2,  # [CLS] and [SEP] take two
                "dimension": model.get_embedding_dimension(),
                "min_norm": 0.99, "max_norm": 1.01,  # vectors are normalised when embedded
                "max_residual_pii_score": ctx.source.quality.max_residual_pii_score,
            }, ctx.run_name)
        ctx.quality.record(verdict)
        if ctx.travelled:
            # Without its result ids: they name this process's validation store, which the
            # flow's data docs cannot render.
            batch.verdicts.append(quality.Verdict(verdict.findings))
        _reject(batch, verdict.rejected())
    _check_failed_share(ctx, batch)
    return batch


def check_deletions(ctx: SyncContext, deleted: int, allow_mass_delete: bool) -> None:
    """Stop before deleting most of a source's index: an emptied or broken source looks the
    same as a mass deletion, and only a person can tell them apart."""
    limits = ctx.source.quality
    indexed = sum(1 for k in ctx.known.values() if not k.quarantined)
    if allow_mass_delete or indexed < limits.min_indexed_for_delete_guard or not deleted:
        return
    if deleted / indexed > limits.max_delete_share:
        raise QualityGateFailed(
            f"the sync would delete {deleted} of the {indexed} indexed documents of "
            f"{ctx.source.name!r} ({deleted / indexed:.0%}, the limit is "
            f"{limits.max_delete_share:.0%}); nothing was deleted. If the source really lost "
            "them, run again with --allow-mass-delete.",
        )


def redact_pii(ctx: SyncContext, batch: Batch) -> Batch:
    """Apply the source's compliance policy: only processed text and titles go on to be
    chunked, embedded and indexed."""
    with _timed(batch, "compliance"):
        try:
            batch.parsed, batch.findings = compliance.apply_policy(ctx.policy, ctx.source,
                                                                   batch.parsed)
        except ComplianceError as error:
            # The batch's documents wait in quarantine for the next sync (which reads them
            # again) rather than pass unchecked; the run goes on with its next batch.
            log.error("compliance stage failed", error=error.log_message,
                      documents=len(batch.parsed))
            batch.rejected += [Rejection(p.document.doc_id, "compliance", error.user_message,
                                         p.document.version) for p in batch.parsed]
            batch.parsed, batch.findings = [], {}
    return batch


def chunk_documents(ctx: SyncContext, batch: Batch) -> Batch:
    with _timed(batch, "chunk"):
        model = load_model(ctx.settings.embedding_model)
        batch.chunks = chunking.chunk_documents(batch.parsed, model.tokenizer,
                                                ctx.settings.chunk_tokens,
                                                ctx.settings.chunk_overlap)
        # Read per batch, so an erasure made while a sync runs holds from its next batch.
        suppressed = ctx.store.suppressed_subjects() if ctx.policy is not None else {}
        for doc_id, chunks in batch.chunks.items():
            if doc_id in batch.findings:
                batch.findings[doc_id].annotate(chunks)
                if suppressed:
                    kept, withheld = batch.findings[doc_id].withhold(chunks, suppressed)
                    if withheld:
                        batch.chunks[doc_id], batch.withheld[doc_id] = kept, withheld
    return batch


def embed_chunks(ctx: SyncContext, batch: Batch) -> Batch:
    with _timed(batch, "embed"):
        texts = [c.text for chunks in batch.chunks.values() for c in chunks]
        embedder = load_embedder(ctx.settings.embedding_model, ctx.settings.embedding_backend,
                                 ctx.settings.cache_dir)
        result = embed_texts(embedder, embedder.cache_key, texts, ctx.store,
                             ctx.settings.embedding_batch_size)
        batch.vectors, batch.embedded = result.vectors, result.embedded
        batch.embedded_by = (embedder.model_name, embedder.backend)
    return batch


def _surplus_filter(ctx: SyncContext, batch: Batch) -> Filter | None:
    """Chunks left over from a longer earlier version of each rewritten document."""
    parts = [
        Filter.by_property("doc_id").equal(doc_id)
        & Filter.by_property("ordinal").greater_or_equal(batch.span(doc_id))
        for doc_id in batch.chunks
        if doc_id not in ctx.known or ctx.known[doc_id].chunk_count > batch.span(doc_id)
    ]
    # A withheld chunk's earlier version, which did not mention the erased subject, goes too.
    parts += [
        Filter.by_property("doc_id").equal(doc_id)
        & Filter.by_property("ordinal").contains_any(ordinals)
        for doc_id, ordinals in batch.withheld.items()
        if doc_id in batch.chunks and doc_id in ctx.known
    ]
    if not parts:
        return None
    return Filter.by_property("source").equal(ctx.source.name) & Filter.any_of(parts)


def index_chunks(ctx: SyncContext, batch: Batch) -> Batch:
    """Write new versions first, then remove what they replace: a failure never leaves a
    document half-gone."""
    if not (batch.chunks or batch.of_kind(ChangeKind.DELETED, ChangeKind.PERMISSIONS)):
        return batch
    with _timed(batch, "index"), connect_index(ctx.settings) as client:
        chunks = [c for doc_chunks in batch.chunks.values() for c in doc_chunks]
        if chunks:
            report = upsert_chunks(client, ctx.collection, chunks, batch.vectors,
                                   embedded_by=batch.embedded_by)
            batch.chunks_written += report.written
        deleted = [c.doc_id for c in batch.of_kind(ChangeKind.DELETED)]
        filters = [f for f in (
            _surplus_filter(ctx, batch),
            Filter.by_property("source").equal(ctx.source.name)
            & Filter.by_property("doc_id").contains_any(deleted) if deleted else None,
        ) if f is not None]
        for where in filters:
            batch.chunks_deleted += delete_where(client, ctx.collection, where)
        collection = client.collections.use(ctx.collection)
        for change in batch.of_kind(ChangeKind.PERMISSIONS):
            known = ctx.known.get(change.doc_id)
            for ordinal in range(known.chunk_count if known else 0):
                # Readers changed, content did not: update the property, keep the vector.
                probe = Chunk(source=ctx.source.name, doc_id=change.doc_id, ordinal=ordinal,
                              text="")
                try:
                    collection.data.update(uuid=probe.uuid,
                                           properties={"principals": list(change.principals)})
                except UnexpectedStatusCodeError as error:
                    if error.status_code == 404:
                        continue  # a chunk erased by a data-subject request leaves a gap
                    raise IndexWriteError(
                        f"Could not update readers of {change.doc_id}", repr(error)
                    ) from error
                except WeaviateBaseError as error:
                    raise IndexWriteError(
                        f"Could not update readers of {change.doc_id}", repr(error)
                    ) from error
    return batch


def commit_batch(ctx: SyncContext, batch: Batch) -> Batch:
    """Record what the batch indexed, quarantine what it rejected, then advance the cursor."""
    with _timed(batch, "commit"):
        rejected = {r.doc_id for r in batch.rejected}
        by_id = {c.doc_id: c for c in batch.changes}
        indexed, subjects, classifications = [], {}, {}
        # Expired documents the index still holds get their time, for the retention purge.
        modified = {d: t for d, t in batch.expired.items() if d in ctx.known}
        for parsed in batch.parsed:
            doc = parsed.document
            change = by_id[doc.doc_id]
            indexed.append((doc.doc_id, doc.version, change.fingerprint, doc.title,
                            batch.span(doc.doc_id), doc.principals))
            if doc.modified is not None:
                modified[doc.doc_id] = doc.modified
            found = batch.findings.get(doc.doc_id)
            if found is not None and doc.doc_id not in rejected:
                subjects[doc.doc_id] = found.subjects(batch.chunks.get(doc.doc_id, []))
                classifications[doc.doc_id] = found.classification
        for change in batch.of_kind(ChangeKind.PERMISSIONS):
            known = ctx.known.get(change.doc_id)
            if known:
                indexed.append((change.doc_id, known.version, change.fingerprint, "",
                                known.chunk_count, list(change.principals)))
        ctx.store.commit_batch(
            ctx.source.name,
            indexed=[i for i in indexed if i[0] not in rejected],
            deleted=[c.doc_id for c in batch.of_kind(ChangeKind.DELETED)],
            fingerprints=[(c.doc_id, c.fingerprint or "")
                          for c in batch.of_kind(ChangeKind.TOUCHED)],
            cursor=batch.cursor,
            subjects=subjects,
            classifications=classifications,
            modified={d: t for d, t in modified.items() if d not in rejected},
        )
        # The ids from ctx too: on a Dask worker, the flow's bound context does not arrive.
        # One line per document is for following an incident (HEADWATER_LOG_LEVEL=DEBUG): at
        # INFO a sync of 100,000 documents would send 100,000 lines to the Prefect API.
        run_log = log.bind(run_id=ctx.run_id, source=ctx.source.name)
        for doc_id, version, *_ in indexed:
            if doc_id not in rejected:
                run_log.debug("document indexed", doc_id=doc_id, version=version)
        for change in batch.of_kind(ChangeKind.DELETED):
            run_log.debug("document deleted", doc_id=change.doc_id)
        for r in batch.rejected:
            ctx.store.quarantine(ctx.source.name, r.doc_id, r.stage, r.reason, r.version)
            # Reasons name the problem, never the content (the audit entry holds the same).
            run_log.warning("document quarantined", doc_id=r.doc_id, stage=r.stage,
                            reason=r.reason)
        if batch.rejected:
            ctx.store.append_audit_entries([
                (SYNC_ACTOR, "ingest.quarantine", f"{ctx.source.name}:{r.doc_id}", "rejected",
                 ctx.run_id, {"stage": r.stage, "reason": r.reason}) for r in batch.rejected])
        ctx.store.renew_lock(ctx.source.name, ctx.lock_owner)
        batch.parsed, batch.chunks, batch.vectors = [], {}, np.zeros((0, 0))
        batch.findings = {}
    return batch


def summary_markdown(summary: dict) -> str:
    counts = ["new", "changed", "deleted", "unchanged", "permissions", "quarantined",
              "expired", "chunks_written", "chunks_deleted", "suppressed", "embedded"]
    lines = [f"# Sync of `{summary['source']}`: {summary['status']}", "",
             "| documents | count |", "| --- | ---: |"]
    lines += [f"| {name.replace('_', ' ')} | {summary.get(name, 0)} |" for name in counts]
    lines += ["", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {stage} | {seconds:.3f} |" for stage, seconds in summary["seconds"].items()]
    if summary.get("quality"):
        lines += ["", *quality_markdown(summary["quality"])]
    if summary.get("message"):
        lines += ["", summary["message"]]
    return "\n".join(lines)


def quality_markdown(rows: list[dict]) -> list[str]:
    lines = ["| suite | expectation | observed | result |", "| --- | --- | --- | --- |"]
    return lines + [f"| {r['suite']} | {r['expectation']} | {r['observed']} | {r['result']} |"
                    for r in rows]
