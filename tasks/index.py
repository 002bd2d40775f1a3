"""Writing chunks to Weaviate and removing them: the index side of every sync."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import weaviate
from weaviate.classes.config import Configure, DataType, Property, Tokenization
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Timeout
from weaviate.classes.query import Filter
from weaviate.collections.classes.filters import _Filters
from weaviate.exceptions import WeaviateBaseError, WeaviateInsertManyAllFailedError

from headwater.errors import IndexUnavailable, IndexWriteError
from headwater.records import Chunk
from headwater.settings import Settings

CHUNK_PROPERTIES = [
    Property(name="text", data_type=DataType.TEXT),
    Property(name="title", data_type=DataType.TEXT),
    Property(name="source", data_type=DataType.TEXT, tokenization=Tokenization.FIELD),
    Property(name="doc_id", data_type=DataType.TEXT, tokenization=Tokenization.FIELD),
    Property(name="ordinal", data_type=DataType.INT),
    Property(name="url", data_type=DataType.TEXT, tokenization=Tokenization.FIELD,
             index_searchable=False),
    Property(name="heading_path", data_type=DataType.TEXT_ARRAY),
    Property(name="char_start", data_type=DataType.INT, index_filterable=False),
    Property(name="char_end", data_type=DataType.INT, index_filterable=False),
    Property(name="modified", data_type=DataType.DATE),
    # Permissions are filtered inside the index, never after retrieval.
    Property(name="principals", data_type=DataType.TEXT_ARRAY, tokenization=Tokenization.FIELD),
    Property(name="pii_types", data_type=DataType.TEXT_ARRAY, tokenization=Tokenization.FIELD),
    Property(name="classification", data_type=DataType.TEXT, tokenization=Tokenization.FIELD,
             index_searchable=False),
    Property(name="text_hash", data_type=DataType.TEXT, tokenization=Tokenization.FIELD,
             index_searchable=False),
    # What made the vector: another model needs a reindex; backends within the guard mix.
    Property(name="embedding_model", data_type=DataType.TEXT, tokenization=Tokenization.FIELD,
             index_searchable=False),
    Property(name="embedding_backend", data_type=DataType.TEXT,
             tokenization=Tokenization.FIELD, index_searchable=False),
]


@dataclass
class IndexReport:
    """What a write did: how many objects were written, and which ones failed and why."""

    written: int = 0
    deleted: int = 0
    failed_objects: list[dict[str, str]] = field(default_factory=list)


@contextmanager
def connect_index(settings: Settings) -> Iterator[weaviate.WeaviateClient]:
    """A client for the configured Weaviate, with deadlines so a dead server fails fast."""
    auth = (
        weaviate.auth.AuthApiKey(settings.weaviate_api_key.get_secret_value())
        if settings.weaviate_api_key
        else None
    )
    timeout = settings.weaviate_timeout_s
    try:
        client = weaviate.connect_to_local(
            host=settings.weaviate_host,
            port=settings.weaviate_http_port,
            grpc_port=settings.weaviate_grpc_port,
            auth_credentials=auth,
            additional_config=AdditionalConfig(
                timeout=Timeout(init=min(10, timeout), query=timeout, insert=timeout)
            ),
            # The client's own checks would ask pypi.org for its newest release at every
            # connection (no host but the stack's at run time) and probe for OIDC; its request
            # for the server's meta data still proves Weaviate reachable.
            skip_init_checks=True,
        )
    except WeaviateBaseError as error:
        raise IndexUnavailable(
            f"Weaviate at {settings.weaviate_url} is not reachable; is the stack up "
            "(`headwater up`)?",
            repr(error),
        ) from error
    try:
        yield client
    finally:
        client.close()


def versioned_name(name: str, version: int) -> str:
    """The collection behind the alias `name` at one version: HeadwaterChunk_v2."""
    return f"{name}_v{version}"


def index_versions(client: weaviate.WeaviateClient, name: str) -> dict[int, str]:
    """Every versioned collection of `name` that exists, by version number."""
    pattern = re.compile(rf"{re.escape(name)}_v(\d+)", re.IGNORECASE)
    found = (pattern.fullmatch(c) for c in client.collections.list_all(simple=True))
    return {int(m.group(1)): m.group(0) for m in found if m}


def alias_target(client: weaviate.WeaviateClient, name: str) -> str | None:
    """The collection the alias `name` points at; None when `name` is no alias."""
    alias = client.alias.get(alias_name=name)
    return alias.collection if alias else None


def ensure_collection(client: weaviate.WeaviateClient, name: str) -> None:
    """Create the chunk index if it is missing, as the alias `name` of `<name>_v1` (so a
    reindex can switch it); an existing one, alias or a collection made before aliases, gains
    the properties added since it was made (none is ever changed or removed)."""
    if client.collections.exists(name):
        _add_missing_properties(client, name)
        return
    first = versioned_name(name, 1)
    create_collection(client, first)
    try:
        client.alias.create(alias_name=name, target_collection=first)
    except WeaviateBaseError as error:
        # Two syncs may race to create it; losing that race is fine.
        if alias_target(client, name) is None:
            raise IndexWriteError(f"Could not create the alias {name}", repr(error)) from error


def create_collection(client: weaviate.WeaviateClient, name: str) -> None:
    """A chunk collection with the current schema (an existing one is left as it is)."""
    if client.collections.exists(name):
        return
    try:
        client.collections.create(
            name,
            vector_config=Configure.Vectors.self_provided(),
            properties=CHUNK_PROPERTIES,
            inverted_index_config=Configure.inverted_index(index_timestamps=True),
        )
    except WeaviateBaseError as error:
        # Two syncs may race to create it; losing that race is fine.
        if not client.collections.exists(name):
            raise IndexWriteError(f"Could not create collection {name}", repr(error)) from error


def delete_index(client: weaviate.WeaviateClient, name: str) -> None:
    """Remove the alias `name`, every versioned collection behind it, and a collection of
    that very name (an index made before aliases)."""
    try:
        client.alias.delete(alias_name=name)
        for collection in [*index_versions(client, name).values(), name]:
            client.collections.delete(collection)
    except WeaviateBaseError as error:
        raise IndexWriteError(f"Could not delete the index {name}", repr(error)) from error


def _add_missing_properties(client: weaviate.WeaviateClient, name: str) -> None:
    collection = client.collections.use(name)
    try:
        have = {p.name for p in collection.config.get().properties}
        for prop in CHUNK_PROPERTIES:
            if prop.name not in have:
                collection.config.add_property(prop)
    except WeaviateBaseError as error:
        # Two syncs may race to add the same property; losing that race is fine.
        have = {p.name for p in collection.config.get().properties}
        if not {p.name for p in CHUNK_PROPERTIES} <= have:
            raise IndexWriteError(f"Could not add properties to {name}", repr(error)) from error


def _properties(chunk: Chunk) -> dict[str, object]:
    return {
        "text": chunk.text,
        "title": chunk.title,
        "source": chunk.source,
        "doc_id": chunk.doc_id,
        "ordinal": chunk.ordinal,
        "url": chunk.url or "",
        "heading_path": chunk.heading_path,
        "char_start": chunk.char_start,
        "char_end": chunk.char_end,
        "modified": chunk.modified,
        "principals": chunk.principals,
        "pii_types": chunk.pii_types,
        "classification": chunk.classification,
        "text_hash": chunk.text_hash,
    }


def upsert_chunks(
    client: weaviate.WeaviateClient,
    name: str,
    chunks: Sequence[Chunk],
    vectors: Sequence[Sequence[float]],
    attempts: int = 2,
    embedded_by: tuple[str, str] = ("", ""),
) -> IndexReport:
    """Write chunks under their deterministic UUIDs (an existing object is replaced).

    Objects Weaviate rejects are retried, then reported in the raised error; none are dropped.
    `embedded_by` (model, backend) is recorded on every object when given.
    """
    if len(chunks) != len(vectors):
        raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
    collection = client.collections.use(name)
    tags = dict(zip(("embedding_model", "embedding_backend"), embedded_by, strict=True)) if (
        all(embedded_by)) else {}
    pending = [
        DataObject(properties={**_properties(c), **tags}, uuid=c.uuid, vector=list(v))
        for c, v in zip(chunks, vectors, strict=True)
    ]
    report = IndexReport()
    for _ in range(attempts):
        try:
            errors = {i: e.message for i, e in collection.data.insert_many(pending).errors.items()}
        except WeaviateInsertManyAllFailedError as error:
            # Every object was refused: still a per-object answer, not a lost batch.
            errors = dict.fromkeys(range(len(pending)), str(error.message))
        except WeaviateBaseError as error:
            raise IndexWriteError(
                f"Weaviate did not accept a batch of {len(pending)} chunks: "
                f"{type(error).__name__}",
                repr(error),
            ) from error
        report.written += len(pending) - len(errors)
        report.failed_objects = [
            {"uuid": str(pending[i].uuid), "message": errors[i]} for i in sorted(errors)
        ]
        if not errors:
            return report
        pending = [pending[i] for i in sorted(errors)]
    raise IndexWriteError(
        f"{len(report.failed_objects)} of {len(chunks)} chunks were rejected by Weaviate",
        "; ".join(f"{f['uuid']}: {f['message']}" for f in report.failed_objects[:10]),
        failed_objects=report.failed_objects,
    )


def delete_where(client: weaviate.WeaviateClient, name: str, where: _Filters) -> int:
    """Delete every object matching a filter, however many (one call deletes a bounded number)."""
    collection = client.collections.use(name)
    deleted = 0
    while True:
        try:
            result = collection.data.delete_many(where=where)
        except WeaviateBaseError as error:
            raise IndexWriteError("Weaviate did not accept a deletion", repr(error)) from error
        if result.failed:
            raise IndexWriteError(f"{result.failed} chunks could not be deleted", repr(result))
        deleted += result.successful
        if result.matches == 0 or result.successful == 0:
            return deleted


def delete_document_chunks(
    client: weaviate.WeaviateClient, name: str, source: str, doc_id: str, keep: int = 0
) -> int:
    """Remove a document's chunks whose ordinal is `keep` or more (all of them for keep=0)."""
    where = (
        Filter.by_property("source").equal(source)
        & Filter.by_property("doc_id").equal(doc_id)
        & Filter.by_property("ordinal").greater_or_equal(keep)
    )
    return delete_where(client, name, where)


def count_chunks(client: weaviate.WeaviateClient, name: str, source: str | None = None) -> int:
    where = Filter.by_property("source").equal(source) if source else None
    result = client.collections.use(name).aggregate.over_all(filters=where, total_count=True)
    return result.total_count or 0


def probe_index(client: weaviate.WeaviateClient, name: str) -> dict[str, object]:
    """Write one object, read it back by vector and delete it: proof the index round-trips."""
    ensure_collection(client, name)
    probe = Chunk(source="headwater-probe", doc_id="probe", ordinal=0, text="probe",
                  principals=["group:headwater-operators"])
    vector = [1.0] + [0.0] * 383
    upsert_chunks(client, name, [probe], [vector])
    found = client.collections.use(name).query.near_vector(near_vector=vector, limit=1)
    read_back = bool(found.objects) and found.objects[0].uuid == probe.uuid
    delete_document_chunks(client, name, probe.source, probe.doc_id)
    meta = client.get_meta()
    return {"collection": name, "read_back": read_back, "weaviate_version": meta.get("version")}
