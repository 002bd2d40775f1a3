"""Answering a question from retrieved documents: generated with citations, or extractive."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from headwater.records import (
    Caller,
    QueryRequest,
    QueryResponse,
    SourceCitation,
    content_hash,
)
from headwater.settings import Settings
from headwater.state import AuditWriter, StateStore
from tasks.embed import QueryEncoder
from tasks.generate import Generator, NumberedSource
from tasks.retrieve import RetrievedDocument, retrieve

NOTHING_FOUND = "I found nothing you have access to that answers this question."

_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its me my of on or our should "
    "that the their there this to was we what when where which who why will with you your".split()
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n{2,}")
_WORD = re.compile(r"[a-z0-9]+")


def _terms(text: str) -> list[str]:
    # A crude stem (the first 6 letters) lets "policies" meet "policy" without a stemmer.
    return [w[:6] for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


@dataclass
class AnswerTrace:
    """What went into an answer, for metrics and the audit trail."""

    retrieval_s: float = 0.0
    generation_s: float = 0.0
    doc_ids: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)


def citations(documents: Sequence[RetrievedDocument]) -> list[SourceCitation]:
    return [
        SourceCitation(n=n, doc_id=d.best.doc_id, title=d.best.title, url=d.best.url,
                       source=d.best.source, snippet=d.best.text[:300],
                       score=round(d.best.score, 4))
        for n, d in enumerate(documents, start=1)
    ]


def extractive_answer(question: str, documents: Sequence[RetrievedDocument],
                      max_sentences: int = 3) -> tuple[str, float]:
    """The sentences that share most with the question, each with its [n] citation."""
    if not documents:
        return NOTHING_FOUND, 0.0
    wanted = set(_terms(question))
    candidates: list[tuple[int, int, str, set[str]]] = []  # (source n, position, sentence, terms)
    for n, doc in enumerate(documents, start=1):
        for chunk in doc.chunks:
            for sentence in _SENTENCE.split(chunk.text):
                sentence = " ".join(sentence.split())
                if len(sentence) >= 20:
                    candidates.append((n, len(candidates), sentence, set(_terms(sentence))))
    if not candidates:
        return NOTHING_FOUND, 0.0
    frequency = Counter(t for *_, terms in candidates for t in terms & wanted)
    scores = [
        sum(math.log(1 + len(candidates) / frequency[t]) for t in wanted & terms)
        / (1 + 0.15 * (n - 1))  # a slight preference for better-ranked sources
        for n, _, _, terms in candidates
    ]
    ranked = sorted(range(len(candidates)), key=scores.__getitem__, reverse=True)
    best = [i for i in ranked[:max_sentences] if scores[i] > 0] or ranked[:1]
    best.sort(key=lambda i: (candidates[i][0], candidates[i][1]))
    text = " ".join(f"{candidates[i][2]} [{candidates[i][0]}]" for i in best)
    covered = wanted & set().union(*(candidates[i][3] for i in best))
    coverage = len(covered) / len(wanted) if wanted else 0.0
    return text, round(min(1.0, documents[0].best.score) * (0.5 + 0.5 * coverage), 3)


def answer_question(
    settings: Settings,
    request: QueryRequest,
    caller: Caller,
    client: Any,
    encoder: QueryEncoder,
    generator: Generator | None = None,
    request_id: str | None = None,
) -> tuple[QueryResponse, AnswerTrace]:
    """Retrieve within the caller's permissions, then answer with numbered citations."""
    started = time.perf_counter()
    trace = AnswerTrace()
    query_vector = encoder.encode(request.question)
    documents = retrieve(
        client, settings.collection, request.question, query_vector, caller.principals,
        request.filters, top_k=request.top_k,
        alpha=settings.retrieval_alpha if request.alpha is None else request.alpha,
        max_chunks_per_doc=request.max_chunks_per_doc, mmr=request.mmr,
        fusion=settings.retrieval_fusion, query_properties=settings.retrieval_query_properties,
    )
    trace.retrieval_s = time.perf_counter() - started
    trace.doc_ids = [d.best.doc_id for d in documents]
    text, confidence = extractive_answer(request.question, documents)
    answered_by = "extractive"
    if documents and generator is not None:
        generation_started = time.perf_counter()
        sources = [NumberedSource(n, d.best.title, "\n\n".join(c.text for c in d.chunks))
                   for n, d in enumerate(documents, start=1)]
        generated = generator.generate(request.question, sources)
        trace.generation_s = time.perf_counter() - generation_started
        if generated is not None:
            text, answered_by = generated.text, generated.answered_by
            trace.attempts = generated.attempts
    response = QueryResponse(
        answer=text,
        sources=citations(documents),
        confidence=confidence,
        processing_time_ms=round((time.perf_counter() - started) * 1000, 1),
        request_id=request_id or str(uuid.uuid4()),
        answered_by=answered_by,
    )
    return response, trace


def generator_for(settings: Settings) -> Generator | None:
    """The configured LLM endpoints with failover, or None for extractive answers."""
    return Generator.from_settings(settings) if settings.llm_endpoints else None


def record_query(audit: StateStore | AuditWriter, caller: Caller, request: QueryRequest,
                 response: QueryResponse, trace: AnswerTrace, channel: str) -> None:
    """Who asked what (as a hash: the question may hold personal data) and what they got."""
    audit.append_audit(
        actor=f"user:{caller.user_id}" if caller.user_id else "anonymous",
        action="query",
        resource=channel,
        outcome="answered" if response.sources else "no_results",
        request_id=response.request_id,
        details={
            "query_hash": content_hash(request.question),
            "groups": caller.groups,
            "doc_ids": trace.doc_ids,
            "answered_by": response.answered_by,
            "processing_time_ms": response.processing_time_ms,  # for `headwater report`
        },
    )
