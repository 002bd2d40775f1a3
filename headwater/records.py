"""Typed records passed between stages, defined once; their ids are deterministic hashes."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime

from pydantic import BaseModel, Field

# Fixed namespace: the same chunk always maps to the same Weaviate UUID, so re-runs never duplicate.
CHUNK_NAMESPACE = uuid.UUID("5b0b7f3e-3f0c-4c1e-9a43-68a1d0c0ffee")

PUBLIC = "public"


def content_hash(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


class SourceDocument(BaseModel):
    """One document as a source system gives it, with who may read it."""

    source: str
    doc_id: str = Field(description="The id of the document within its source.")
    title: str
    url: str | None = None
    mime_type: str = "text/plain"
    content: bytes | None = None
    text: str | None = None
    modified: datetime | None = None
    author: str | None = None
    version: str = Field(description="ETag, modified time or content hash: changes with content.")
    principals: list[str] = Field(
        default_factory=list,
        description="Who may read it: 'user:<id>', 'group:<id>', or 'public'.",
    )
    metadata: dict[str, str] = Field(default_factory=dict)


class Chunk(BaseModel):
    """A piece of a document's text, the unit that is embedded, indexed and retrieved."""

    source: str
    doc_id: str
    ordinal: int
    text: str
    title: str = ""
    url: str | None = None
    heading_path: list[str] = Field(default_factory=list)
    char_start: int = 0
    char_end: int = 0
    token_count: int = 0  # the model's own tokens, without its special tokens
    modified: datetime | None = None
    principals: list[str] = Field(default_factory=list)
    pii_types: list[str] = Field(default_factory=list)
    classification: str = "internal"  # public, internal, confidential or restricted

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.uuid5(CHUNK_NAMESPACE, f"{self.source}\x1f{self.doc_id}\x1f{self.ordinal}")

    @property
    def text_hash(self) -> str:
        return content_hash(self.text)


class Caller(BaseModel):
    """Who is asking: a user id and groups from a verified token, or nobody (public only)."""

    user_id: str | None = None
    groups: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)

    @classmethod
    def from_principals(cls, principals: list[str]) -> Caller:
        """A caller from 'user:<id>' and 'group:<id>' strings (as a deployment is given)."""
        users = [p.removeprefix("user:") for p in principals if p.startswith("user:")]
        if len(users) > 1:
            raise ValueError("at most one 'user:' principal")
        groups = [p.removeprefix("group:") for p in principals if p.startswith("group:")]
        unknown = [p for p in principals if p != PUBLIC and not p.startswith(("user:", "group:"))]
        if unknown:
            raise ValueError(f"principals must be 'user:<id>' or 'group:<id>', not {unknown}")
        return cls(user_id=users[0] if users else None, groups=groups)

    @property
    def principals(self) -> list[str]:
        found = [PUBLIC]
        if self.user_id:
            found.append(f"user:{self.user_id}")
        found += [f"group:{g}" for g in self.groups]
        return found


class QueryFilters(BaseModel):
    sources: list[str] | None = None
    modified_after: datetime | None = None
    modified_before: datetime | None = None


class QueryRequest(BaseModel):
    """A question and how to search for its answer."""

    question: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(default=5, ge=1, le=50, description="Documents to cite at most.")
    filters: QueryFilters = Field(default_factory=QueryFilters)
    alpha: float | None = Field(default=None, ge=0, le=1,
                                description="0 is keyword only, 1 is vector only.")
    max_chunks_per_doc: int = Field(default=2, ge=1, le=10)
    mmr: bool = Field(default=False,
                      description="Diversify documents (maximal marginal relevance).")


class SourceCitation(BaseModel):
    n: int
    doc_id: str
    title: str
    url: str | None
    source: str
    snippet: str
    score: float


class QueryResponse(BaseModel):
    answer: str
    sources: list[SourceCitation]
    confidence: float
    processing_time_ms: float
    request_id: str
    answered_by: str
