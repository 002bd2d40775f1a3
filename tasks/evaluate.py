"""Retrieval quality: labelled query sets, ranking metrics, variants and paired A/B statistics."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from headwater.errors import HeadwaterError
from headwater.records import QueryFilters
from headwater.settings import Settings
from headwater.state import StateStore, utcnow
from tasks.embed import encode
from tasks.retrieve import RetrievedDocument, retrieve

# The metrics every variant is scored on, in report order; A/B tests compare these.
METRICS = ("recall@5", "recall@10", "mrr@10", "ndcg@10")
# Ranking metrics look this deep, so an evaluated variant returns at least this many documents.
DEPTH = 10
SIGNIFICANCE = 0.05
RESAMPLES = 10_000
SEED = 20261123
# Which half of a query set a query falls in: a hash of this and its id, so a query keeps its
# half when others are added or removed. Settings are tuned on `tune` and reported on `test`.
SPLIT_SEED = "headwater-split-1"
Split = Literal["tune", "test", "all"]
SPLITS: tuple[Split, ...] = ("tune", "test", "all")


class QuerySetError(HeadwaterError):
    """A query set (JSONL) is missing or a line of it is not a valid labelled query."""


class VariantError(HeadwaterError):
    """A retrieval variant is named with a setting that does not exist or is out of range."""


class LabelledQuery(BaseModel):
    """One line of a query set: a query and the documents (ids or urls) that answer it."""

    model_config = {"extra": "forbid"}

    id: str | None = None
    query: str = Field(min_length=1)
    relevant: list[str] = Field(default_factory=list)
    grades: dict[str, int] = Field(default_factory=dict,
                                   description="Graded relevance: 0 not relevant, higher better.")

    @model_validator(mode="after")
    def _judged(self) -> LabelledQuery:
        if any(grade < 0 for grade in self.grades.values()):
            raise ValueError("grades must be 0 or more")
        if not self.relevant_ids:
            raise ValueError("a query needs at least one relevant document (`relevant`, or a "
                             "grade above 0)")
        return self

    @property
    def relevant_ids(self) -> set[str]:
        return set(self.relevant) | {doc for doc, grade in self.grades.items() if grade > 0}

    @property
    def gains(self) -> dict[str, int]:
        """Each relevant document's grade; listed without a grade, it counts 1."""
        return {doc: self.grades.get(doc, 1) for doc in self.relevant_ids}


def parse_query_set(lines: Iterable[str], name: str = "query set") -> list[LabelledQuery]:
    """Labelled queries from JSONL lines; the first bad line is named in the error."""
    queries: list[LabelledQuery] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            query = LabelledQuery.model_validate(json.loads(line))
        except json.JSONDecodeError as error:
            raise QuerySetError(f"{name}, line {number}: not valid JSON ({error.msg})") from error
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}"
                                 for e in error.errors())
            raise QuerySetError(f"{name}, line {number}: {problems}") from error
        query.id = query.id or f"line-{number}"
        if query.id in seen:
            raise QuerySetError(f"{name}, line {number}: id {query.id!r} is used twice")
        seen.add(query.id)
        queries.append(query)
    if not queries:
        raise QuerySetError(f"{name} holds no queries")
    return queries


def load_query_set(path: str | Path) -> list[LabelledQuery]:
    path = Path(path)
    if not path.is_file():
        raise QuerySetError(f"query set {path} does not exist")
    with path.open() as lines:
        return parse_query_set(lines, str(path))


def fingerprint(queries: Sequence[LabelledQuery]) -> str:
    """Equal for equal query sets: stored runs are only compared on the same queries."""
    canonical = json.dumps([q.model_dump() for q in queries], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def split_of(query_id: str, seed: str = SPLIT_SEED) -> Split:
    """The half a query belongs to, from its id alone."""
    digest = hashlib.sha256(f"{seed}:{query_id}".encode()).digest()
    return "tune" if digest[0] % 2 == 0 else "test"


def select_split(queries: Sequence[LabelledQuery], split: str,
                 seed: str = SPLIT_SEED) -> list[LabelledQuery]:
    """The queries of one half (`tune` or `test`), or all of them."""
    if split not in SPLITS:
        raise QuerySetError(f"there is no split {split!r}: use one of {', '.join(SPLITS)}")
    chosen = [q for q in queries if split == "all" or split_of(str(q.id), seed) == split]
    if not chosen:
        raise QuerySetError(f"the {split} half of the query set holds no queries")
    return chosen


# -- metrics on one ranked list ---------------------------------------------------------------


def recall_at(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant)


def reciprocal_rank(ranked: Sequence[str], relevant: set[str], k: int = DEPTH) -> float:
    return next((1 / rank for rank, doc in enumerate(ranked[:k], start=1) if doc in relevant),
                0.0)


def ndcg_at(ranked: Sequence[str], gains: dict[str, int], k: int = DEPTH) -> float:
    """Normalised discounted cumulative gain, with exponential gain (2^grade - 1)."""
    def dcg(grades: Iterable[int]) -> float:
        return sum((2**g - 1) / math.log2(rank + 1) for rank, g in enumerate(grades, start=1))

    seen: set[str] = set()
    found = []
    for doc in ranked[:k]:
        # A document listed twice earns its gain once.
        found.append(0 if doc in seen else gains.get(doc, 0))
        seen.add(doc)
    ideal = dcg(sorted(gains.values(), reverse=True)[:k])
    return dcg(found) / ideal if ideal else 0.0


def judged_ids(documents: Sequence[RetrievedDocument], query: LabelledQuery) -> list[str]:
    """The retrieved documents in the query's own vocabulary: a doc id or url it names."""
    named = query.relevant_ids | set(query.grades)
    return [d.best.url if d.best.doc_id not in named and d.best.url in named else d.best.doc_id
            for d in documents]


def score_ranking(ranked: Sequence[str], query: LabelledQuery) -> dict[str, float]:
    relevant = query.relevant_ids
    return {"recall@5": recall_at(ranked, relevant, 5),
            "recall@10": recall_at(ranked, relevant, 10),
            "mrr@10": reciprocal_rank(ranked, relevant, 10),
            "ndcg@10": ndcg_at(ranked, query.gains, 10)}


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else 0.0


# -- variants -----------------------------------------------------------------------------------


class Variant(BaseModel):
    """Named retrieval settings to evaluate. Chunk size is a property of an index, not of a
    search: evaluate it by syncing into another collection and naming that `collection`."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=200)
    alpha: float | None = Field(default=None, ge=0, le=1,
                                description="None: HEADWATER_RETRIEVAL_ALPHA.")
    top_k: int = Field(default=DEPTH, ge=1, le=50)
    mmr: bool = False
    max_chunks_per_doc: int = Field(default=2, ge=1, le=10)
    collection: str | None = Field(default=None, description="None: HEADWATER_COLLECTION.")
    fusion: Literal["documentRankedFusion", "relativeScoreFusion", "rankedFusion"] | None = Field(
        default=None, description="None: HEADWATER_RETRIEVAL_FUSION.")
    query_properties: list[str] | None = Field(
        default=None, min_length=1, description="None: HEADWATER_RETRIEVAL_QUERY_PROPERTIES.")

    @field_validator("query_properties", mode="before")
    @classmethod
    def _plus_separated(cls, value: object) -> object:
        # In `name:key=value,...` commas separate settings, so properties are joined by `+`.
        return [p for p in value.split("+") if p.strip()] if isinstance(value, str) else value

    def resolved(self, settings: Settings) -> Variant:
        """This variant with the settings' values where it names none: what actually ran."""
        return self.model_copy(update={
            "alpha": settings.retrieval_alpha if self.alpha is None else self.alpha,
            "fusion": self.fusion or settings.retrieval_fusion,
            "query_properties": self.query_properties or list(
                settings.retrieval_query_properties),
            "collection": self.collection or settings.collection})


PRESETS: dict[str, dict[str, Any]] = {
    "default": {}, "hybrid": {}, "bm25": {"alpha": 0.0}, "vector": {"alpha": 1.0},
    "mmr": {"mmr": True},
}


def parse_variant(spec: str | dict[str, Any] | Variant) -> Variant:
    """A variant from `name` (a preset or a new name), `name:key=value,...`, or a mapping.

    `bm25`, `vector`, `hybrid`/`default` and `mmr` are presets; e.g. `top1:top_k=1`,
    `small-chunks:collection=DocsChunks100`, `wide:alpha=0.75,max_chunks_per_doc=1`,
    `ranked:fusion=rankedFusion,query_properties=text+title^3`.
    """
    if isinstance(spec, Variant):
        return spec
    if isinstance(spec, dict):
        values = dict(spec)
    else:
        name, _, rest = spec.partition(":")
        values = {"name": name.strip()}
        for pair in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise VariantError(f"variant {spec!r}: {pair!r} is not key=value")
            values[key.strip()] = value.strip()
    base = PRESETS.get(str(values.get("name", "")), {})
    try:
        return Variant.model_validate({**base, **values})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise VariantError(f"variant {spec!r} is not valid: {problems}") from error


# -- running a variant against the index --------------------------------------------------------


@dataclass
class QueryScore:
    query_id: str
    scores: dict[str, float]
    latency_s: float
    retrieved: list[str]


@dataclass
class VariantResult:
    variant: Variant
    queries: list[QueryScore]
    embed_s_per_query: float = 0.0

    def values(self, metric: str) -> list[float]:
        return [q.scores[metric] for q in self.queries]

    def metrics(self) -> dict[str, float]:
        latencies = [q.latency_s for q in self.queries]
        found = {m: round(float(np.mean(self.values(m))), 4) for m in METRICS}
        return {**found,
                "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
                "latency_p95_ms": round(percentile(latencies, 95) * 1000, 1),
                "embed_ms_per_query": round(self.embed_s_per_query * 1000, 2),
                "queries": len(self.queries)}


def embed_queries(model: Any, queries: Sequence[LabelledQuery],
                  batch_size: int = 64) -> tuple[np.ndarray, float]:
    """Every query's vector in one batched model call, and its seconds per query."""
    started = time.perf_counter()
    vectors = encode(model, [q.query for q in queries], batch_size)
    return vectors, (time.perf_counter() - started) / len(queries)


def run_variant(client: Any, settings: Settings, queries: Sequence[LabelledQuery],
                vectors: np.ndarray, variant: Variant, principals: Sequence[str],
                embed_s_per_query: float = 0.0) -> VariantResult:
    """Every query through the API's own retrieval (permission filter, hybrid search,
    grouping by document), scored against its labels; latency is the search alone. What the
    variant leaves unset comes from `settings`, as it does for the API."""
    variant = variant.resolved(settings)
    scores = []
    for query, vector in zip(queries, vectors, strict=True):
        started = time.perf_counter()
        documents = retrieve(
            client, str(variant.collection), query.query, vector, principals,
            QueryFilters(), top_k=variant.top_k, alpha=float(variant.alpha or 0.0),
            max_chunks_per_doc=variant.max_chunks_per_doc, mmr=variant.mmr,
            fusion=str(variant.fusion), query_properties=variant.query_properties or [])
        latency = time.perf_counter() - started
        ranked = judged_ids(documents, query)
        scores.append(QueryScore(str(query.id), score_ranking(ranked, query), latency, ranked))
    return VariantResult(variant, scores, embed_s_per_query)


def tuning_score(metrics: dict[str, float]) -> float:
    """What tuning maximises: the mean of recall@5 (is the answer among the first five) and
    MRR@10 (how near the top it is)."""
    return (metrics["recall@5"] + metrics["mrr@10"]) / 2


def choose_tuned(report: dict[str, Any], among: Iterable[str] | None = None) -> str:
    """The variant the rule fixed before tuning picks, of those named `among` (default: all):
    the best tuning score; a tie (to four places) goes to the better nDCG@10, then to the
    variant listed first."""
    eligible = set(report["variants"] if among is None else among)
    variants = [item for item in report["variants"].items() if item[0] in eligible]
    if not variants:
        raise VariantError("no evaluated variant to choose from")
    best = max(variants, key=lambda item: (
        round(tuning_score(item[1]["metrics"]), 4), item[1]["metrics"]["ndcg@10"],
        -variants.index(item)))
    return best[0]


# -- paired comparison ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Variant minus baseline on one metric, over the same queries."""

    metric: str
    baseline: str
    variant: str
    baseline_mean: float
    variant_mean: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "no significant difference"
        return "significantly better" if self.difference > 0 else "significantly worse"


def compare_paired(baseline: Sequence[float], variant: Sequence[float], metric: str = "",
                   names: tuple[str, str] = ("A", "B"), resamples: int = RESAMPLES,
                   seed: int = SEED, level: float = SIGNIFICANCE) -> Comparison:
    """A paired test on per-query scores: the difference of means with a bootstrap percentile
    confidence interval, and a two-sided sign-flip permutation p-value. Seeded, so a report is
    reproducible. Significant when p < level and the interval leaves out zero."""
    a, b = np.asarray(baseline, dtype=float), np.asarray(variant, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("a paired comparison needs the same, non-empty set of queries")
    rng = np.random.default_rng(seed)
    differences = b - a
    observed = float(differences.mean())
    picks = rng.integers(0, differences.size, size=(resamples, differences.size))
    low, high = np.quantile(differences[picks].mean(axis=1), [level / 2, 1 - level / 2])
    signs = rng.choice((-1.0, 1.0), size=(resamples, differences.size))
    flipped = np.abs((signs * differences).mean(axis=1))
    # The tolerance keeps float noise from splitting ties with the observed difference.
    extreme = int(np.count_nonzero(flipped >= abs(observed) - 1e-12))
    p_value = (extreme + 1) / (resamples + 1)
    significant = p_value < level and not (low <= 0 <= high)
    return Comparison(metric, names[0], names[1], round(float(a.mean()), 4),
                      round(float(b.mean()), 4), round(observed, 4), round(float(low), 4),
                      round(float(high), 4), round(p_value, 4), bool(significant))


def compare_variants(results: Sequence[VariantResult], seed: int = SEED) -> list[Comparison]:
    """Every variant against the first (the baseline), on every metric."""
    baseline = results[0]
    return [compare_paired(baseline.values(m), other.values(m), m,
                           (baseline.variant.name, other.variant.name), seed=seed)
            for other in results[1:] for m in METRICS]


# -- the report ------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    run_id: str
    dataset: str
    fingerprint: str
    principals: list[str]
    results: list[VariantResult]
    comparisons: list[Comparison] = field(default_factory=list)

    def table(self) -> list[dict[str, Any]]:
        return [{"variant": r.variant.name, **r.metrics()} for r in self.results]

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "dataset": self.dataset, "fingerprint": self.fingerprint,
                "principals": self.principals,
                "variants": {r.variant.name: {"config": r.variant.model_dump(),
                                              "metrics": r.metrics()} for r in self.results},
                "comparisons": [{**asdict(c), "verdict": c.verdict} for c in self.comparisons]}


def record_report(store: StateStore, report: EvaluationReport) -> None:
    for result in report.results:
        store.record_evaluation(
            report.run_id, result.variant.name, report.dataset, report.fingerprint,
            result.variant.model_dump(), result.metrics(),
            [{"id": q.query_id, **q.scores, "latency_ms": round(q.latency_s * 1000, 2),
              "retrieved": q.retrieved} for q in result.queries])


def _markdown_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    columns = list(rows[0])
    return ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
            *("| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows)]


def report_markdown(report: dict[str, Any]) -> str:
    """The evaluation as Markdown: a row per variant, then each A/B comparison."""
    rows = [{"variant": name, **v["metrics"]} for name, v in report["variants"].items()]
    lines = [f"# Retrieval evaluation {report['run_id']}", "",
             f"Query set `{report['dataset']}` (fingerprint {report['fingerprint'][:12]}), "
             f"asked as {', '.join(report['principals'])}.", "", *_markdown_table(rows)]
    if report["comparisons"]:
        lines += ["", f"Paired comparisons against `{rows[0]['variant']}` (bootstrap 95% "
                  f"interval, sign-flip permutation p-value, seed {SEED}):", ""]
        lines += _markdown_table([
            {"variant": c["variant"], "metric": c["metric"], "baseline": c["baseline_mean"],
             "variant mean": c["variant_mean"], "difference": c["difference"],
             "95% CI": f"[{c['ci_low']}, {c['ci_high']}]", "p": c["p_value"],
             "verdict": c["verdict"]} for c in report["comparisons"]])
    return "\n".join(lines)


# -- online feedback -----------------------------------------------------------------------------


@dataclass
class FeedbackSummary:
    window_h: float
    questions: int
    answered: int
    empty: int
    up: int
    down: int
    worst: list[dict[str, Any]]

    @property
    def answer_rate(self) -> float | None:
        return self.answered / self.questions if self.questions else None

    @property
    def empty_rate(self) -> float | None:
        return self.empty / self.questions if self.questions else None

    @property
    def positive_ratio(self) -> float | None:
        return self.up / (self.up + self.down) if self.up + self.down else None


def summarise_feedback(store: StateStore, window_h: float = 24,
                       now: datetime | None = None, worst: int = 10) -> FeedbackSummary:
    """Questions and ratings of the last `window_h` hours. Questions are known by hash only
    (the audit trail never holds their text), so the worst are named by hash and documents."""
    since = (now or utcnow()) - timedelta(hours=window_h)
    asked = store.audit_since("query", since)
    ratings = store.feedback_since(since)
    by_request = {row.request_id: row for row in asked}
    votes: dict[str, Counter] = defaultdict(Counter)
    for rating in ratings:
        question = by_request.get(rating.request_id)
        # Feedback on a question asked before the window still counts, under its request id.
        key = (question.details or {}).get("query_hash", rating.request_id) if question else (
            rating.request_id)
        votes[key]["down" if rating.rating < 0 else "up"] += 1
        votes[key]["comments"] += 1 if rating.comment else 0
    documents = {(row.details or {}).get("query_hash"): (row.details or {}).get("doc_ids", [])
                 for row in asked}
    ranked = sorted((k for k, v in votes.items() if v["down"]),
                    key=lambda k: (-votes[k]["down"], votes[k]["up"], k))[:worst]
    return FeedbackSummary(
        window_h, len(asked), sum(1 for r in asked if r.outcome == "answered"),
        sum(1 for r in asked if r.outcome == "no_results"),
        sum(1 for r in ratings if r.rating > 0), sum(1 for r in ratings if r.rating < 0),
        [{"question": key[:12], "down": votes[key]["down"], "up": votes[key]["up"],
          "comments": votes[key]["comments"],
          "documents": ", ".join(documents.get(key, [])[:3]) or "-"} for key in ranked])


def feedback_markdown(summary: FeedbackSummary) -> str:
    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    lines = [f"# Answers and feedback, last {summary.window_h:g} h", "",
             "| figure | value |", "| --- | ---: |",
             f"| questions | {summary.questions} |",
             f"| answer rate (at least one source) | {share(summary.answer_rate)} |",
             f"| empty-result rate | {share(summary.empty_rate)} |",
             f"| feedback (up / down) | {summary.up} / {summary.down} |",
             f"| positive feedback ratio | {share(summary.positive_ratio)} |", "",
             "## Worst questions by negative feedback", ""]
    if summary.worst:
        lines.append("Questions are named by the first digits of their hash (the audit trail "
                     "keeps no question text); comments are in the state store's `feedback` "
                     "table.")
        lines += ["", *_markdown_table(summary.worst)]
    else:
        lines.append("No negative feedback in this window.")
    return "\n".join(lines)
