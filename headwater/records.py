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
    modified: datetime | None = None
    principals: list[str] = Field(default_factory=list)
    pii_types: list[str] = Field(default_factory=list)

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.uuid5(CHUNK_NAMESPACE, f"{self.source}\x1f{self.doc_id}\x1f{self.ordinal}")

    @property
    def text_hash(self) -> str:
        return content_hash(self.text)
