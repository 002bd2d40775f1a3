"""Data-subject requests (access, erasure, rectification, portability) and retention purges."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr
from sqlalchemy import select
from weaviate.classes.query import Filter
from weaviate.exceptions import WeaviateBaseError

from headwater.config import SourceConfig, load_sources
from headwater.errors import HeadwaterError, IndexUnavailable
from headwater.settings import Settings
from headwater.state import DocumentRow, SourceBusy, StateStore
from tasks.compliance import SUBJECT_TYPES, subject_hmac
from tasks.index import connect_index, delete_where
from tasks.ingest import retention_cutoff

KINDS = ("access", "erasure", "rectification", "portability")
Scope = Literal["chunks", "document"]
RETENTION_ACTOR = "system:retention"
# The format portability exports declare on their first line (README, "Data-subject requests").
PORTABILITY_FORMAT = "headwater.portability/1"
# Weaviate answers at most 10,000 objects per filtered query (offset included): documents are
# read in small groups so a group never comes near that.
_PAGE = 500
_GROUP = 20
_CHUNK_PROPERTIES = ["source", "doc_id", "ordinal", "title", "url", "text", "heading_path",
                     "pii_types", "classification", "text_hash"]


class PrivacyRequestError(HeadwaterError):
    """A data-subject request that cannot be carried out as asked."""


class SubjectRef(BaseModel, frozen=True):
    """An identifier as the request knows it: its type and keyed hash, never its value."""

    entity_type: str
    subject: str = Field(description="HMAC-SHA256 of the normalized identifier.")


class PrivacyRequest(BaseModel):
    """A request in progress: who asked, for whom (by hash), and how."""

    request_id: str
    kind: str
    requested_by: str
    subjects: list[SubjectRef]
    scope: Scope = "chunks"
    flow_run_id: str | None = None  # the Prefect run serving it, named in both audit entries

    @property
    def hmacs(self) -> list[str]:
        return sorted({s.subject for s in self.subjects})

    @property
    def resource(self) -> str:
        return "subjects:" + ",".join(self.hmacs)


class ExportedChunk(BaseModel):
    id: str
    ordinal: int
    text: str = Field(description="As indexed: already rewritten by the source's policy.")
    heading_path: list[str] = Field(default_factory=list)
    pii_types: list[str] = Field(default_factory=list)


class ExportedDocument(BaseModel):
    source: str
    doc_id: str
    title: str
    url: str | None
    classification: str | None
    entity_types: list[str] = Field(description="As what the subject occurs in it.")
    chunks: list[ExportedChunk]


class PrivacyResult(BaseModel):
    """What a request did; counts and hashes only, never an identifier's value."""

    request_id: str
    kind: str
    requested_by: str
    subjects: list[SubjectRef]
    outcome: str = "completed"
    documents: int = 0
    chunks: int = 0
    chunks_erased: int = 0
    subject_rows_removed: int = 0
    cached_vectors_removed: int = 0
    answers_withdrawn: int = 0
    export_path: str | None = None
    resynced_sources: list[str] = Field(default_factory=list)
    per_source: dict[str, dict[str, int]] = Field(default_factory=dict)
    message: str = ""


class RetentionResult(BaseModel):
    source: str
    days: int
    cutoff: datetime
    outcome: str = "completed"  # or "busy": a sync held the source; the next purge retries
    documents: int = 0
    chunks_deleted: int = 0
    cached_vectors_removed: int = 0
    answers_withdrawn: int = 0


# -- identifiers -------------------------------------------------------------------------------

# The CLI's options, in the words of the subject index.
CLI_KINDS = {"email": "EMAIL_ADDRESS", "phone": "PHONE_NUMBER", "name": "PERSON"}


def _values(value: SecretStr | str | Sequence[SecretStr | str]) -> list[str]:
    items = [value] if isinstance(value, SecretStr | str) else list(value)
    return [v.get_secret_value() if isinstance(v, SecretStr) else v for v in items]


def subject_refs(identifiers: Mapping[str, SecretStr | str | Sequence[SecretStr | str]],
                 key: SecretStr | None) -> list[SubjectRef]:
    """Typed identifiers as the subject index knows them: normalized, then keyed-hashed with
    the same function the compliance stage used."""
    if key is None:
        raise PrivacyRequestError("a data-subject request needs HEADWATER_SUBJECT_KEY, the key "
                                  "the subject index was made with")
    unknown = sorted(set(identifiers) - set(SUBJECT_TYPES))
    if unknown:
        raise PrivacyRequestError(f"unknown identifier types {unknown}; known: "
                                  f"{sorted(SUBJECT_TYPES)}")
    refs = {SubjectRef(entity_type=kind, subject=subject_hmac(value, kind, key))
            for kind, given in identifiers.items() for value in _values(given) if value.strip()}
    if not refs:
        raise PrivacyRequestError("a data-subject request needs at least one identifier")
    return sorted(refs, key=lambda r: (r.entity_type, r.subject))


def load_identifiers(secret_block: str) -> dict[str, Any]:
    """Identifiers kept in a Prefect Secret block (a JSON object), for deployment runs, whose
    parameters the Prefect server stores as given."""
    from prefect.blocks.system import Secret

    value = Secret.load(secret_block).get()
    found = json.loads(value) if isinstance(value, str) else value
    if not isinstance(found, dict):
        raise PrivacyRequestError(f"Secret block {secret_block!r} must hold a JSON object of "
                                  "entity type -> identifier(s)")
    return {kind: SecretStr(v) if isinstance(v, str) else [SecretStr(x) for x in v]
            for kind, v in found.items()}


# -- the audit trail ---------------------------------------------------------------------------


def open_request(settings: Settings, kind: str, requested_by: str,
                 identifiers: Mapping[str, Any], scope: Scope = "chunks",
                 flow_run_id: str | None = None) -> PrivacyRequest:
    """Hash the identifiers and record the request's start (by hashes only)."""
    if kind not in KINDS:
        raise PrivacyRequestError(f"unknown request kind {kind!r}; known: {list(KINDS)}")
    if scope not in ("chunks", "document"):
        raise PrivacyRequestError(f"unknown erasure scope {scope!r}: chunks or document")
    if not requested_by.strip():
        raise PrivacyRequestError("a data-subject request names who asked for it "
                                  "(requested_by)")
    request = PrivacyRequest(request_id=str(uuid.uuid4()), kind=kind,
                             requested_by=requested_by,
                             subjects=subject_refs(identifiers, settings.resolved_subject_key),
                             scope=scope, flow_run_id=flow_run_id)
    StateStore(settings.resolved_state_db_url).append_audit(
        requested_by, f"privacy.{kind}", request.resource, "started", request.request_id,
        {"entity_types": sorted({s.entity_type for s in request.subjects}), "scope": scope,
         "flow_run_id": flow_run_id})
    return request


def close_request(settings: Settings, request: PrivacyRequest, result: PrivacyResult | None,
                  error: BaseException | None = None) -> PrivacyResult:
    """Record the request's end with its counts; a failed request is recorded as failed."""
    if result is None:
        result = PrivacyResult(request_id=request.request_id, kind=request.kind,
                               requested_by=request.requested_by, subjects=request.subjects,
                               outcome="failed")
    if error is not None:
        result.outcome = "failed"
        result.message = (error.user_message if isinstance(error, HeadwaterError)
                          else type(error).__name__)
    counts = result.model_dump(include={"documents", "chunks", "chunks_erased",
                                        "subject_rows_removed", "cached_vectors_removed",
                                        "answers_withdrawn", "resynced_sources",
                                        "per_source", "message"})
    counts["flow_run_id"] = request.flow_run_id
    StateStore(settings.resolved_state_db_url).append_audit(
        request.requested_by, f"privacy.{request.kind}", request.resource, result.outcome,
        request.request_id, counts)
    return result


# -- finding what the index holds of a subject -------------------------------------------------


def _read_chunks(collection: Any, where: Any) -> list[dict[str, Any]]:
    found, offset = [], 0
    try:
        while True:
            page = collection.query.fetch_objects(filters=where, limit=_PAGE, offset=offset,
                                                  return_properties=_CHUNK_PROPERTIES)
            found += [{**o.properties, "id": str(o.uuid)} for o in page.objects]
            if len(page.objects) < _PAGE:
                return found
            offset += _PAGE
    except WeaviateBaseError as error:
        raise IndexUnavailable("Weaviate could not be read for a privacy request",
                               repr(error)) from error


def _where(source: str, doc_id: str, ordinals: Sequence[int] | None) -> Any:
    where = Filter.by_property("source").equal(source) & Filter.by_property("doc_id").equal(
        doc_id)
    return where & Filter.by_property("ordinal").contains_any(list(ordinals)) if (
        ordinals is not None) else where


def _document_rows(store: StateStore, source: str, doc_ids: Sequence[str]) -> dict[str, Any]:
    with store.session() as s:
        rows = list(s.execute(select(DocumentRow).where(
            DocumentRow.source == source, DocumentRow.doc_id.in_(list(doc_ids)))).scalars())
        s.expunge_all()
    return {r.doc_id: r for r in rows}


def find_mentions(settings: Settings, request: PrivacyRequest) -> list[ExportedDocument]:
    """Every document and chunk the subject index says mentions the subject, as indexed."""
    store = StateStore(settings.resolved_state_db_url)
    found = store.documents_for_subjects(request.hmacs)
    if not found:
        return []
    documents = []
    with connect_index(settings) as client:
        if not client.collections.exists(settings.collection):
            return []
        collection = client.collections.use(settings.collection)
        for source in sorted({d.source for d in found}):
            mine = [d for d in found if d.source == source]
            rows = _document_rows(store, source, [d.doc_id for d in mine])
            for doc in mine:
                chunks = sorted(_read_chunks(collection, _where(source, doc.doc_id,
                                                                doc.ordinals)),
                                key=lambda c: c["ordinal"]) if doc.ordinals else []
                row = rows.get(doc.doc_id)
                first = chunks[0] if chunks else {}
                documents.append(ExportedDocument(
                    source=source, doc_id=doc.doc_id,
                    title=first.get("title") or (row.title if row else ""),
                    url=first.get("url") or None,
                    classification=(row.classification if row else None)
                    or first.get("classification"),
                    entity_types=doc.types,
                    chunks=[ExportedChunk(id=c["id"], ordinal=c["ordinal"], text=c["text"],
                                          heading_path=list(c.get("heading_path") or []),
                                          pii_types=list(c.get("pii_types") or []))
                            for c in chunks]))
    return documents


def _private_file(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Personal data: readable by the operator only.
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w")


def export_mentions(settings: Settings, request: PrivacyRequest,
                    output: str | None = None) -> PrivacyResult:
    """Access: one JSON document; portability: JSON lines (a header line, then a line per
    document). Written under the data dir unless `output` names a file."""
    documents = find_mentions(settings, request)
    portable = request.kind == "portability"
    default = settings.data_dir / "privacy" / (
        f"{request.request_id}-{request.kind}." + ("jsonl" if portable else "json"))
    path = Path(output) if output else default
    header = {"request_id": request.request_id, "kind": request.kind,
              "created_at": datetime.now(UTC).isoformat(),
              "subjects": [s.model_dump() for s in request.subjects],
              "documents": len(documents), "chunks": sum(len(d.chunks) for d in documents)}
    with _private_file(path) as sink:
        if portable:
            sink.write(json.dumps({"record": "request", "format": PORTABILITY_FORMAT,
                                   **header}) + "\n")
            for document in documents:
                sink.write(json.dumps({"record": "document", **document.model_dump()}) + "\n")
        else:
            json.dump({**header, "results": [d.model_dump() for d in documents]}, sink,
                      indent=2)
    return PrivacyResult(
        request_id=request.request_id, kind=request.kind, requested_by=request.requested_by,
        subjects=request.subjects, documents=len(documents),
        chunks=sum(len(d.chunks) for d in documents), export_path=str(path),
        per_source=_per_source((d.source, len(d.chunks)) for d in documents))


def _per_source(pairs: Any) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for source, chunks in pairs:
        entry = counts.setdefault(source, {"documents": 0, "chunks": 0})
        entry["documents"] += 1
        entry["chunks"] += chunks
    return counts


# -- erasure and rectification -----------------------------------------------------------------


@contextmanager
def held_source(store: StateStore, source: str, wait_s: float) -> Iterator[None]:
    """The source's sync lock, waited for up to `wait_s`: a sync must not write a batch it
    prepared before the suppression list changed while chunks are being erased."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            owner = store.acquire_lock(source)
            break
        except SourceBusy as busy:
            if time.monotonic() >= deadline:
                raise PrivacyRequestError(
                    f"source {source!r} is being synced; run the request again when the sync "
                    "has finished (it is idempotent)", str(busy)) from busy
            time.sleep(2)
    try:
        yield
    finally:
        store.release_lock(source, owner)


def _erase(client: Any, name: str, source: str,
           erased: Mapping[str, Sequence[int] | None]) -> tuple[int, set[str]]:
    """Delete chunks (ordinals, or every chunk for None) from the index; returns how many
    went and the text hashes they had (their cached vectors go next)."""
    if not client.collections.exists(name):
        return 0, set()
    collection = client.collections.use(name)
    hashes: set[str] = set()
    deleted = 0
    for doc_id, ordinals in erased.items():
        if ordinals is not None and not ordinals:
            continue
        where = _where(source, doc_id, ordinals)
        hashes |= {c["text_hash"] for c in _read_chunks(collection, where) if c.get("text_hash")}
        deleted += delete_where(client, name, where)
    return deleted, hashes


def erase_mentions(settings: Settings, request: PrivacyRequest,
                   lock_wait_s: float = 300.0) -> PrivacyResult:
    """Erasure: the subject goes on the suppression list, then every chunk mentioning it (or
    every document, with scope "document") leaves Weaviate, with its subject rows and its
    cached vectors. Document rows stay, with their chunk counts: an erased chunk leaves a gap
    in the ordinals, so later syncs replace and delete exactly as before."""
    store = StateStore(settings.resolved_state_db_url)
    # First, so a sync from now on withholds what is about to be erased.
    store.suppress_subjects([(s.subject, s.entity_type) for s in request.subjects],
                            request.scope, request.request_id)
    found = store.documents_for_subjects(request.hmacs)
    result = PrivacyResult(request_id=request.request_id, kind=request.kind,
                           requested_by=request.requested_by, subjects=request.subjects,
                           documents=len(found))
    hashes: set[str] = set()
    with connect_index(settings) as client:
        for source in sorted({d.source for d in found}):
            mine = [d for d in found if d.source == source]
            with held_source(store, source, lock_wait_s):
                whole = request.scope == "document"
                rows = _document_rows(store, source, [d.doc_id for d in mine])
                erased = {d.doc_id: (None if whole else d.ordinals) for d in mine}
                deleted, found_hashes = _erase(client, settings.collection, source, erased)
                hashes |= found_hashes
                forgotten = {d.doc_id: (range(rows[d.doc_id].chunk_count) if whole and
                                        d.doc_id in rows else d.ordinals) for d in mine}
                result.subject_rows_removed += store.forget_chunks(source, forgotten,
                                                                   request.hmacs)
                result.answers_withdrawn += withdraw_answers(
                    store, source, erased, request.requested_by, request.request_id)
            result.chunks_erased += deleted
            result.chunks += sum(len(d.ordinals) for d in mine)
            result.per_source[source] = {"documents": len(mine), "chunks_erased": deleted}
    result.cached_vectors_removed = store.forget_vectors(hashes)
    result.message = (f"erased {result.chunks_erased} chunks of {result.documents} documents "
                      f"(scope: {request.scope}); the subject is suppressed, so no sync "
                      "indexes what mentions it again")
    return result


def rectify_mentions(settings: Settings, request: PrivacyRequest,
                     lock_wait_s: float = 300.0) -> PrivacyResult:
    """Rectification: the old identifiers are erased (and suppressed), and the documents that
    held them are marked to be read again, so a re-sync indexes what the source now says. The
    source holds the truth: a correction made only here would be undone by the next sync."""
    store = StateStore(settings.resolved_state_db_url)
    found = store.documents_for_subjects(request.hmacs)
    result = erase_mentions(settings, request, lock_wait_s)
    for source in sorted({d.source for d in found}):
        store.mark_for_reread(source, [d.doc_id for d in found if d.source == source])
    result.resynced_sources = sorted({d.source for d in found})
    result.message += ("; the affected documents are read again from their sources by the next "
                       "sync (the flow runs it unless told not to): the source holds the truth, "
                       "so correct the value there, or chunks still holding the old value stay "
                       "withheld")
    return result


# -- persisted answers -------------------------------------------------------------------------

WITHDRAWN_ANSWER = ("This answer was withdrawn: a document it was built from has since been "
                    "erased or purged. Ask again for an answer from what is indexed now.")


def withdraw_answers(store: StateStore, source: str, doc_ids: Iterable[str], actor: str,
                     request_id: str | None) -> int:
    """Re-write the stored results of `answer-query` runs built from these documents, so no
    persisted answer keeps quoting what was erased; returns how many were withdrawn. Whole
    documents count: the answer may quote any chunk, and ordinals move as documents change."""
    withdrawn = 0
    for flow_run_id in store.answers_from(source, doc_ids):
        rewritten = rewrite_stored_answer(flow_run_id)
        store.forget_persisted_answer(flow_run_id)
        store.append_audit(actor, "answer.withdrawn", f"flow-run:{flow_run_id}",
                           "withdrawn" if rewritten else "not_found", request_id,
                           {"source": source, "results_rewritten": rewritten})
        withdrawn += 1
    return withdrawn


def rewrite_stored_answer(flow_run_id: str) -> int:
    """Overwrite every persisted result of a flow run (and its task runs) with the withdrawal
    notice, in its own storage and serializer; returns how many results were rewritten (0 when
    the run or its results are already gone)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultRecordMetadata, ResultStore, resolve_result_storage

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(uuid.UUID(flow_run_id))
        except ObjectNotFound:
            return 0
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    rewritten = 0
    for state in [run.state, *(t.state for t in tasks)]:
        metadata = state.data if state is not None else None
        if not isinstance(metadata, ResultRecordMetadata) or metadata.storage_key is None:
            continue
        key = metadata.storage_key
        if metadata.storage_block_id is not None:
            storage = resolve_result_storage(metadata.storage_block_id)
        elif Path(key).is_absolute():
            if not Path(key).exists():
                continue
            storage = LocalFileSystem(basepath=str(Path(key).parent))
        else:
            storage = None  # the default result storage, as Prefect reads it back
        notice = {"answer": WITHDRAWN_ANSWER, "sources": [], "confidence": 0.0,
                  "processing_time_ms": 0.0, "request_id": flow_run_id,
                  "answered_by": "withdrawn"}
        ResultStore(result_storage=storage, serializer=metadata.serializer).write(
            obj=notice, key=key)
        rewritten += 1
    return rewritten


# -- retention ---------------------------------------------------------------------------------


def retention_sources(settings: Settings, names: Sequence[str] | None = None
                      ) -> list[SourceConfig]:
    """The configured sources with a `retention:` block (of `names`, when given)."""
    sources = load_sources(settings.config)
    unknown = sorted(set(names or []) - set(sources))
    if unknown:
        raise PrivacyRequestError(f"no sources named {unknown} in {settings.config}")
    return [s for s in sources.values()
            if s.retention is not None and (not names or s.name in names)]


def purge_expired(settings: Settings, source: SourceConfig, now: datetime | None = None,
                  lock_wait_s: float = 60.0) -> RetentionResult:
    """Remove from Weaviate, the embedding cache and the state store every document of the
    source last modified (at the source) before its retention; audited."""
    cutoff = retention_cutoff(source, now)
    if cutoff is None:
        raise PrivacyRequestError(f"source {source.name!r} has no retention")
    result = RetentionResult(source=source.name, days=source.retention.days, cutoff=cutoff)
    store = StateStore(settings.resolved_state_db_url)
    store.ensure_source(source.name, source.type)
    try:
        with held_source(store, source.name, lock_wait_s):
            expired = store.expired_documents(source.name, cutoff)
            if expired:
                with connect_index(settings) as client:
                    deleted, hashes = _erase(client, settings.collection, source.name,
                                             dict.fromkeys(expired))
                result.chunks_deleted = deleted
                result.cached_vectors_removed = store.forget_vectors(hashes)
                result.answers_withdrawn = withdraw_answers(store, source.name, expired,
                                                            RETENTION_ACTOR, None)
                store.commit_batch(source.name, indexed=[], deleted=expired)
            result.documents = len(expired)
    except PrivacyRequestError:
        result.outcome = "busy"  # a sync holds the source; the next purge tries again
    store.append_audit(RETENTION_ACTOR, "privacy.retention", f"source:{source.name}",
                       result.outcome, details={"days": result.days,
                                                "cutoff": cutoff.isoformat(),
                                                "documents": result.documents,
                                                "chunks_deleted": result.chunks_deleted,
                                                "cached_vectors_removed":
                                                    result.cached_vectors_removed,
                                                "answers_withdrawn":
                                                    result.answers_withdrawn})
    return result


# -- summaries ---------------------------------------------------------------------------------


def request_markdown(result: PrivacyResult) -> str:
    """The request in one screen: counts and hashes, never an identifier's value."""
    lines = [f"# Data-subject request `{result.request_id}`: {result.kind}, {result.outcome}",
             "", f"requested by {result.requested_by}; subjects (keyed hashes): "
             + ", ".join(f"{s.entity_type} {s.subject[:12]}" for s in result.subjects), "",
             "| count | value |", "| --- | ---: |"]
    for name in ("documents", "chunks", "chunks_erased", "subject_rows_removed",
                 "cached_vectors_removed", "answers_withdrawn"):
        lines.append(f"| {name.replace('_', ' ')} | {getattr(result, name)} |")
    if result.per_source:
        lines += ["", "| source | " + " | ".join(next(iter(result.per_source.values()))) + " |",
                  "| --- |" + " ---: |" * len(next(iter(result.per_source.values())))]
        lines += [f"| {source} | " + " | ".join(str(v) for v in counts.values()) + " |"
                  for source, counts in result.per_source.items()]
    if result.export_path:
        lines += ["", f"export: {result.export_path}"]
    if result.resynced_sources:
        lines += ["", "re-synced: " + ", ".join(result.resynced_sources)]
    if result.message:
        lines += ["", result.message]
    return "\n".join(lines)


def retention_markdown(results: Sequence[RetentionResult]) -> str:
    lines = ["# Retention purge", "", "| source | days | cutoff | outcome | documents | chunks "
             "deleted |", "| --- | ---: | --- | --- | ---: | ---: |"]
    lines += [f"| {r.source} | {r.days} | {r.cutoff:%Y-%m-%d %H:%M} | {r.outcome} | "
              f"{r.documents} | {r.chunks_deleted} |" for r in results]
    if not results:
        lines += ["", "no source has a `retention:` block"]
    return "\n".join(lines)
