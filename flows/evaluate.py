"""Retrieval quality: offline on query sets (`evaluate_retrieval`) and online (feedback)."""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import opaque

from headwater.errors import retry_transient
from headwater.records import Caller
from headwater.settings import get_settings
from headwater.state import StateStore
from tasks import evaluate
from tasks.embed import load_embedder
from tasks.index import connect_index

load_query_set = task(name="load_query_set", cache_policy=NO_CACHE)(evaluate.load_query_set)
select_split = task(name="select_split", cache_policy=NO_CACHE)(evaluate.select_split)
compare_variants = task(name="compare_variants", cache_policy=NO_CACHE)(
    evaluate.compare_variants)


@task(name="embed_queries", cache_policy=NO_CACHE)
def embed_queries(queries: list[evaluate.LabelledQuery]) -> tuple:
    settings = get_settings()  # questions on the index's backend, as the API embeds them
    return evaluate.embed_queries(load_embedder(settings.embedding_model,
                                                settings.embedding_backend, settings.cache_dir),
                                  queries)


@task(name="run_variant", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def run_variant(queries: list[evaluate.LabelledQuery], embedded: tuple,
                variant: evaluate.Variant, principals: list[str]) -> evaluate.VariantResult:
    settings = get_settings()
    vectors, embed_s = embedded
    with connect_index(settings) as client:
        return evaluate.run_variant(client, settings, queries, vectors, variant, principals,
                                    embed_s)


@task(name="publish_evaluation", cache_policy=NO_CACHE)
def publish_evaluation(report: evaluate.EvaluationReport) -> dict:
    evaluate.record_report(StateStore(get_settings().resolved_state_db_url), report)
    summary = report.as_dict()
    create_table_artifact(key="retrieval-evaluation", table=report.table(),
                          description=f"Retrieval metrics per variant on {report.dataset}")
    create_markdown_artifact(key="retrieval-evaluation-report",
                             markdown=evaluate.report_markdown(summary),
                             description="Metrics and paired A/B comparisons")
    return summary


@flow(name="evaluate-retrieval", log_prints=True)
def evaluate_retrieval(dataset: str, variants: list[Any] | None = None,
                       principals: list[str] | None = None, split: str = "all") -> dict:
    """Score each variant (the first is the A/B baseline) on `dataset`, or on its `tune` or
    `test` half, as `principals` would see the index: public documents only when none are
    given."""
    chosen = [evaluate.parse_variant(v) for v in variants or ["default"]]
    asking = Caller.from_principals(principals or []).principals
    queries = select_split(load_query_set(dataset), split)
    embedded = opaque(embed_queries(queries))
    results = [run_variant(queries, embedded, variant, asking) for variant in chosen]
    # A half is named with the set: its queries, and so its fingerprint, are not the set's.
    named = dataset if split == "all" else f"{dataset} ({split} half)"
    report = evaluate.EvaluationReport(str(flow_run.id or uuid.uuid4()), named,
                                       evaluate.fingerprint(queries), asking, results,
                                       compare_variants(opaque(results)))
    return publish_evaluation(opaque(report))


@task(name="summarise_answers", cache_policy=NO_CACHE)
def summarise_answers(window_h: float) -> evaluate.FeedbackSummary:
    return evaluate.summarise_feedback(StateStore(get_settings().resolved_state_db_url),
                                       window_h)


@flow(name="summarise-feedback")
def summarise_feedback(window_h: float = 24) -> str:
    """The last `window_h` hours of answers and ratings, as a markdown artifact."""
    markdown = evaluate.feedback_markdown(summarise_answers(window_h))
    create_markdown_artifact(key="feedback-summary", markdown=markdown,
                             description=f"Answers and feedback, last {window_h:g} h")
    return markdown
