"""Cutting parsed documents into chunks measured by the embedding model's own tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from headwater.records import Chunk
from tasks.parse import ParsedDocument

# A chunk may end early, at a sentence or paragraph end, if that keeps at least this share.
_MIN_FILL = 0.6
_BREAKS = (".", "!", "?", "\n", ";", ":")


def _windows(offsets: Sequence[tuple[int, int]], text: str, max_tokens: int,
             overlap: int) -> list[tuple[int, int]]:
    """Token windows over a section as (start token, end token) pairs, ending at sentence ends
    where possible."""
    spans: list[tuple[int, int]] = []
    start, total = 0, len(offsets)
    while start < total:
        end = min(start + max_tokens, total)
        if end < total:
            floor = start + int(max_tokens * _MIN_FILL)
            for cut in range(end, floor, -1):
                token_end = offsets[cut - 1][1]
                if text[token_end - 1 : token_end] in _BREAKS:
                    end = cut
                    break
        spans.append((start, end))
        if end >= total:
            break
        start = max(end - overlap, start + 1)
    return spans


def chunk_documents(
    parsed: Sequence[ParsedDocument], tokenizer: Any, max_tokens: int = 200, overlap: int = 32
) -> dict[str, list[Chunk]]:
    """Chunks per document id: heading-aware, overlapping, never over `max_tokens` tokens."""
    if overlap >= max_tokens:
        raise ValueError("overlap must be smaller than max_tokens")
    jobs = [(p, s) for p in parsed for s in p.sections]
    texts = [p.text[s.start : s.end] for p, s in jobs]
    # One tokenizer call for the whole batch: the fast tokenizer works on the batch in Rust.
    # Sections longer than the model's window are expected here: they are cut below.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)["offset_mapping"] if texts else []
    result: dict[str, list[Chunk]] = {p.document.doc_id: [] for p in parsed}
    for (doc, section), text, offsets in zip(jobs, texts, encoded, strict=True):
        chunks = result[doc.document.doc_id]
        for first, last in _windows(offsets, text, max_tokens, overlap):
            start, end = offsets[first][0], offsets[last - 1][1]
            d = doc.document
            chunks.append(Chunk(
                source=d.source, doc_id=d.doc_id, ordinal=len(chunks),
                text=text[start:end], title=d.title, url=d.url,
                heading_path=section.heading_path,
                char_start=section.start + start, char_end=section.start + end,
                token_count=last - first,
                modified=d.modified, principals=d.principals,
            ))
    return result
