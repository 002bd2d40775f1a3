"""Chunking by the model's tokenizer: bounded, overlapping, heading-aware, with true offsets."""

from __future__ import annotations

import itertools

import pytest

from headwater.records import SourceDocument
from tasks.chunk import chunk_documents
from tasks.embed import load_model
from tasks.parse import parse_document


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("all-MiniLM-L6-v2").tokenizer


def _parsed(text: str):
    return parse_document(SourceDocument(source="s", doc_id="d", title="T",
                                         mime_type="text/markdown", content=text.encode(),
                                         version="v"))


def test_no_chunk_is_over_the_token_limit_and_offsets_point_at_the_text(tokenizer) -> None:
    body = " ".join(f"Sentence number {i} describes the pump maintenance step." for i in range(300))
    parsed = _parsed(f"# Manual\n\n{body}\n\n## Appendix\n\nShort appendix.")
    chunks = chunk_documents([parsed], tokenizer, max_tokens=64, overlap=16)["d"]
    assert len(chunks) > 10
    for chunk in chunks:
        assert len(tokenizer(chunk.text, add_special_tokens=False)["input_ids"]) <= 64
        assert parsed.text[chunk.char_start : chunk.char_end] == chunk.text
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].heading_path == ["Manual", "Appendix"]
    assert chunks[0].heading_path == ["Manual"]


def test_neighbouring_chunks_overlap_and_prefer_sentence_ends(tokenizer) -> None:
    body = " ".join(f"Step {i} is done." for i in range(200))
    chunks = chunk_documents([_parsed(body)], tokenizer, max_tokens=50, overlap=10)["d"]
    for before, after in itertools.pairwise(chunks):
        assert after.char_start < before.char_end  # they share text
    assert all(c.text.endswith(".") for c in chunks)


def test_a_heading_starts_a_new_chunk(tokenizer) -> None:
    parsed = _parsed("# A\n\nAlpha text.\n\n# B\n\nBeta text.")
    chunks = chunk_documents([parsed], tokenizer)["d"]
    assert [(c.heading_path, c.text) for c in chunks] == [
        (["A"], "A\n\nAlpha text."), (["B"], "B\n\nBeta text.")]


def test_chunk_ids_are_stable_across_runs(tokenizer) -> None:
    parsed = _parsed("# A\n\nSame text.")
    first = chunk_documents([parsed], tokenizer)["d"]
    second = chunk_documents([parsed], tokenizer)["d"]
    assert [c.uuid for c in first] == [c.uuid for c in second]
