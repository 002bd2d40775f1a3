"""Retrieval's pure parts: diversity, the mandatory permission filter, extractive answers."""

from __future__ import annotations

import numpy as np
import pytest

from headwater.records import Caller, QueryFilters
from tasks.answer import NOTHING_FOUND, extractive_answer
from tasks.retrieve import RetrievedChunk, RetrievedDocument, _mmr, search_filter


def _doc(doc_id: str, score: float, vector: list[float], text: str = "") -> RetrievedDocument:
    return RetrievedDocument([RetrievedChunk(
        doc_id=doc_id, source="s", title=doc_id, url=None, text=text, heading_path=[],
        ordinal=0, score=score, vector=np.asarray(vector, dtype=np.float32))])


def test_mmr_prefers_a_different_document_over_a_near_duplicate() -> None:
    docs = [_doc("a", 1.0, [1, 0]), _doc("a-copy", 0.99, [1, 0]), _doc("b", 0.8, [0, 1])]
    assert [d.best.doc_id for d in _mmr(docs, 2)] == ["a", "b"]


def test_a_search_without_principals_is_refused() -> None:
    with pytest.raises(ValueError):
        search_filter([], QueryFilters())


def test_a_caller_without_identity_has_only_the_public_principal() -> None:
    assert Caller().principals == ["public"]
    assert Caller(user_id="ann", groups=["hr"]).principals == ["public", "user:ann", "group:hr"]


def test_caller_principals_round_trip_and_reject_unknown_kinds() -> None:
    assert Caller.from_principals(["user:ann", "group:hr"]).principals == [
        "public", "user:ann", "group:hr"]
    with pytest.raises(ValueError):
        Caller.from_principals(["role:admin"])


def test_the_extractive_answer_cites_the_sentences_that_match_the_question() -> None:
    docs = [
        _doc("leave", 0.9, [1, 0], "Annual leave is 25 days. The canteen opens at noon."),
        _doc("pumps", 0.5, [0, 1], "The BP-200 pump moves 200 litres per minute."),
    ]
    text, confidence = extractive_answer("How many days of annual leave?", docs)
    assert text == "Annual leave is 25 days. [1]"
    assert 0 < confidence <= 1
    assert extractive_answer("anything", []) == (NOTHING_FOUND, 0.0)
