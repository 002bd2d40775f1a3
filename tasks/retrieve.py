"""Hybrid retrieval inside the caller's permissions, grouped by document."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import weaviate
from weaviate.classes.query import Filter, HybridFusion, MetadataQuery
from weaviate.exceptions import WeaviateBaseError

from headwater.errors import IndexUnavailable
from headwater.records import QueryFilters


@dataclass
class RetrievedChunk:
    doc_id: str
    source: str
    title: str
    url: str | None
    text: str
    heading_path: list[str]
    ordinal: int
    score: float
    vector: np.ndarray | None = field(default=None, repr=False)


@dataclass
class RetrievedDocument:
    """A document with its best chunks, best first."""

    chunks: list[RetrievedChunk]

    @property
    def best(self) -> RetrievedChunk:
        return self.chunks[0]


# Only what an answer shows: parsing every property of every candidate costs real time.
RETURNED = ["doc_id", "source", "title", "url", "text", "heading_path", "ordinal"]


FUSIONS = {"relativeScoreFusion": HybridFusion.RELATIVE_SCORE,
           "rankedFusion": HybridFusion.RANKED}
# Ranked fusion scores are weighted reciprocal ranks, 1/(60 + rank) from rank 0: at most 1/60,
# for a chunk first in both lists. Scaled by 60 they lie in 0..1 as relative scores do, so an
# answer's confidence and MMR read either alike.
RANKED_SCALE = {"rankedFusion": 60.0}
# Ours, not Weaviate's: the keyword and the vector search each rank documents (by their best
# chunk), and the two document rankings are fused by weighted reciprocal rank. Fusing chunks
# instead lets a page's many middling chunks crowd out the one page both searches put first.
DOCUMENT_FUSION = "documentRankedFusion"
# The rank constant of the document fusion, 1/(k + rank) from rank 1: chosen with alpha on the
# tuning half of the Python docs benchmark (10 and 60 tried; docs/benchmarks.md).
DOCUMENT_RANK_K = 10


def candidate_count(top_k: int, max_chunks_per_doc: int) -> int:
    """Chunks to fetch so that grouping by document still fills `top_k` documents."""
    return top_k * max_chunks_per_doc * 3


def search_filter(principals: Sequence[str], filters: QueryFilters) -> Filter:
    """The mandatory permission filter, plus the caller's own filters; applied in the index."""
    if not principals:
        raise ValueError("a search needs at least one principal ('public')")
    where = Filter.by_property("principals").contains_any(list(principals))
    if filters.sources:
        where = where & Filter.by_property("source").contains_any(filters.sources)
    if filters.modified_after:
        where = where & Filter.by_property("modified").greater_or_equal(filters.modified_after)
    if filters.modified_before:
        where = where & Filter.by_property("modified").less_or_equal(filters.modified_before)
    return where


def _mmr(documents: list[RetrievedDocument], k: int,
         weight: float = 0.7) -> list[RetrievedDocument]:
    """Maximal marginal relevance over documents' best chunks: relevant, but not repetitive."""
    chosen: list[RetrievedDocument] = []
    pool = list(documents)
    top = max((d.best.score for d in pool), default=1.0) or 1.0
    while pool and len(chosen) < k:
        def gain(doc: RetrievedDocument) -> float:
            if not chosen or doc.best.vector is None:
                return doc.best.score / top
            similarity = max(float(doc.best.vector @ c.best.vector) for c in chosen
                             if c.best.vector is not None)
            return weight * doc.best.score / top - (1 - weight) * similarity

        best = max(pool, key=gain)
        chosen.append(best)
        pool.remove(best)
    return chosen


def retrieve(
    client: weaviate.WeaviateClient,
    collection: str,
    question: str,
    query_vector: Sequence[float],
    principals: Sequence[str],
    filters: QueryFilters,
    top_k: int = 5,
    alpha: float = 0.5,
    max_chunks_per_doc: int = 2,
    mmr: bool = False,
    fusion: str = "relativeScoreFusion",
    query_properties: Sequence[str] = ("text", "title^2"),
) -> list[RetrievedDocument]:
    """Up to `top_k` documents the caller may read, each with its best chunks; `fusion` and
    `query_properties` are HEADWATER_RETRIEVAL_FUSION's and _QUERY_PROPERTIES' values."""
    candidates = candidate_count(top_k, max_chunks_per_doc)
    search = client.collections.use(collection).query
    where = search_filter(principals, filters)
    try:
        if fusion == DOCUMENT_FUSION:
            documents = _fused_by_document(search, question, query_vector, where, alpha,
                                           candidates, query_properties, mmr,
                                           max_chunks_per_doc)
        else:
            result = search.hybrid(
                query=question,
                vector=list(query_vector),
                alpha=alpha,
                limit=candidates,
                filters=where,
                fusion_type=FUSIONS[fusion],
                query_properties=list(query_properties),
                return_properties=RETURNED,
                return_metadata=MetadataQuery(score=True),
                include_vector=mmr,
            )
            documents = _grouped([(obj, float(obj.metadata.score or 0.0)
                                   * RANKED_SCALE.get(fusion, 1.0)) for obj in result.objects],
                                 mmr, max_chunks_per_doc)
    except WeaviateBaseError as error:
        raise IndexUnavailable("The search index did not answer; try again shortly.",
                               repr(error)) from error
    return _mmr(documents, top_k) if mmr else documents[:top_k]


def _chunk(obj: Any, score: float, mmr: bool) -> RetrievedChunk:
    p = obj.properties
    vector = obj.vector.get("default") if mmr and obj.vector else None
    return RetrievedChunk(
        doc_id=str(p["doc_id"]), source=str(p["source"]), title=str(p.get("title") or ""),
        url=str(p.get("url") or "") or None, text=str(p["text"]),
        heading_path=list(p.get("heading_path") or []), ordinal=int(p["ordinal"]),
        score=score, vector=np.asarray(vector, dtype=np.float32) if vector is not None else None,
    )


def _grouped(scored: Sequence[tuple[Any, float]], mmr: bool,
             max_chunks_per_doc: int) -> list[RetrievedDocument]:
    """Chunks (best first) grouped by document, documents by their best chunk."""
    by_doc: dict[tuple[str, str], RetrievedDocument] = {}
    for obj, score in scored:
        chunk = _chunk(obj, score, mmr)
        doc = by_doc.setdefault((chunk.source, chunk.doc_id), RetrievedDocument([]))
        if len(doc.chunks) < max_chunks_per_doc:
            doc.chunks.append(chunk)
    return sorted(by_doc.values(), key=lambda d: d.best.score, reverse=True)


def _fused_by_document(search: Any, question: str, query_vector: Sequence[float], where: Filter,
                       alpha: float, candidates: int, query_properties: Sequence[str],
                       mmr: bool, max_chunks_per_doc: int) -> list[RetrievedDocument]:
    """DOCUMENT_FUSION: a keyword and a vector search, each filtered in the index, whose
    document rankings are fused with weights 1 - alpha and alpha. A document's score is its
    fused score scaled to 0..1 (1: first in both); its chunks are ordered by their own."""
    asked = {"limit": candidates, "filters": where, "return_properties": RETURNED,
             "include_vector": mmr}
    lists = [(1 - alpha, search.bm25(query=question, query_properties=list(query_properties),
                                     **asked).objects if alpha < 1 else []),
             (alpha, search.near_vector(near_vector=list(query_vector), **asked).objects
              if alpha > 0 else [])]
    doc_score: dict[tuple[str, str], float] = {}
    chunk_score: dict[Any, float] = {}
    objects: dict[Any, Any] = {}
    for weight, found in lists:
        ranked: set[tuple[str, str]] = set()
        for rank, obj in enumerate(found, 1):
            key = (str(obj.properties["source"]), str(obj.properties["doc_id"]))
            objects.setdefault(obj.uuid, obj)
            chunk_score[obj.uuid] = chunk_score.get(obj.uuid, 0.0) + weight / (
                DOCUMENT_RANK_K + rank)
            if key not in ranked:
                ranked.add(key)
                doc_score[key] = doc_score.get(key, 0.0) + weight / (
                    DOCUMENT_RANK_K + len(ranked))
    scale = DOCUMENT_RANK_K + 1
    chunks = sorted(objects, key=lambda u: chunk_score[u], reverse=True)
    documents = _grouped([(objects[u], chunk_score[u] * scale) for u in chunks], mmr,
                         max_chunks_per_doc)
    for document in documents:
        best = document.best
        # A document ranks no lower than its best chunk in either list, so its score is the
        # highest of its own.
        best.score = doc_score[(best.source, best.doc_id)] * scale
    return sorted(documents, key=lambda d: d.best.score, reverse=True)
