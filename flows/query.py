"""`answer_query`: an audited, API-triggerable answer to one question, within its permissions."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from headwater.records import Caller, QueryFilters, QueryRequest
from headwater.settings import get_settings
from headwater.state import StateStore
from tasks.answer import answer_question, generator_for, record_query
from tasks.embed import query_encoder
from tasks.index import connect_index


# Only the flow's return value is stored (one copy of the answer, which erasure can find).
@task(name="answer_question", cache_policy=NO_CACHE, persist_result=False)
def answer_question_task(request: QueryRequest, caller: Caller, request_id: str) -> dict:
    settings = get_settings()
    with connect_index(settings) as client:
        response, trace = answer_question(settings, request, caller, client,
                                          query_encoder(settings.embedding_model),
                                          generator_for(settings), request_id)
    store = StateStore(settings.resolved_state_db_url)
    record_query(store, caller, request, response, trace, channel="prefect")
    # The answer outlives this run in Prefect's result storage: an erasure of any document it
    # was built from withdraws it (tasks/privacy.py withdraw_answers).
    store.record_persisted_answer(request_id, {(s.source, s.doc_id) for s in response.sources})
    return response.model_dump(mode="json")


@flow(name="answer-query", persist_result=True)
def answer_query(question: str, principals: list[str] | None = None,
                 filters: dict[str, Any] | None = None, top_k: int = 5) -> dict:
    """Answer from what `principals` may read (public documents only when none are given)."""
    request = QueryRequest(question=question, top_k=top_k,
                           filters=QueryFilters.model_validate(filters or {}))
    caller = Caller.from_principals(principals or [])
    return answer_question_task(request, caller, str(flow_run.id or "local"))
