"""Users rate answers: stored, audited, counted in /metrics, and summarised every day."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from conftest import FolderSource, bearer, synced_corpus
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from headwater.api import create_app
from headwater.state import StateStore, utcnow
from tasks.evaluate import feedback_markdown, summarise_feedback

SECRET = "test-signing-secret-of-enough-length"
# Free text from a user, with personal data in it: stored, but never a label or an audit detail.
COMMENT = "Wrong band for me, call Jane Roe on +49 151 2345678"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, local_stack) -> Iterator[FolderSource]:
    with synced_corpus(tmp_path_factory.mktemp("feedback"), "TestFeedback", {
        "leave.md": "# Annual leave\n\nEvery employee has 25 days of annual leave per year.\n",
        "pump.md": "# BP-200 pump\n\nThe BP-200 pump is serviced once a year.\n",
    }, jwt_secret=SECRET) as source:
        yield source


@pytest.fixture(scope="module")
def api(corpus: FolderSource) -> Iterator[TestClient]:
    with TestClient(create_app(corpus.settings)) as client:
        yield client


def _auth(sub: str, groups: tuple[str, ...] = ("staff",), roles: tuple[str, ...] = ("user",),
          ) -> dict[str, str]:
    return {"Authorization": f"Bearer {bearer(SECRET, sub, list(groups), list(roles))}"}


def _ask(api: TestClient, question: str, who: dict[str, str]) -> str:
    response = api.post("/v1/query", json={"question": question}, headers=who)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def _rate(api: TestClient, who: dict[str, str], request_id: str, rating: object,
          comment: str | None = None):
    return api.post("/v1/feedback", headers=who,
                    json={"request_id": request_id, "rating": rating, "comment": comment})


def _series(api: TestClient) -> dict[tuple[str, tuple], float]:
    text = api.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_feedback_round_trips_into_metrics_and_the_audit_trail(
        api: TestClient, corpus: FolderSource) -> None:
    alice = _auth("alice")
    before = _series(api)
    leave = _ask(api, "How many days of annual leave do we get?", alice)
    pump = _ask(api, "How often is the BP-200 serviced?", alice)

    rated = _rate(api, alice, leave, "up")
    assert rated.status_code == 201, rated.text
    assert rated.json() == {"feedback_id": rated.json()["feedback_id"], "request_id": leave,
                            "rating": "up"}
    assert _rate(api, alice, pump, -1, COMMENT).json()["rating"] == "down"

    after = _series(api)
    for rating in ("up", "down"):
        key = ("headwater_feedback_total", (("rating", rating),))
        assert after[key] - before.get(key, 0) == 1
    assert after["headwater_feedback_positive_ratio", ()] == 0.5
    assert after["headwater_answer_rate_ratio", ()] == 1.0
    assert after["headwater_empty_results_total", ()] == before.get(
        ("headwater_empty_results_total", ()), 0)
    assert after["headwater_answer_citations_count", ()] >= 2
    assert "Jane" not in api.get("/metrics").text

    audited = {e.resource: e for e in corpus.store.audit_entries("query.feedback")}
    assert (audited[leave].actor, audited[leave].outcome) == ("user:alice", "up")
    assert (audited[pump].outcome, audited[pump].details["comment"]) == ("down", True)
    assert "Jane" not in str(audited[pump].details)
    assert corpus.store.verify_audit().intact
    stored = [f for f in corpus.store.feedback_since(utcnow() - timedelta(hours=1))
              if f.request_id == pump]
    assert [(f.actor, f.rating, f.comment) for f in stored] == [("user:alice", -1, COMMENT)]


def test_feedback_on_an_unknown_or_someone_elses_answer_is_not_found(api: TestClient) -> None:
    asked = _ask(api, "How many days of annual leave do we get?", _auth("alice"))
    for who, request_id in ((_auth("alice"), "no-such-request"), (_auth("bob"), asked)):
        response = _rate(api, who, request_id, "down")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"


def test_feedback_needs_a_valid_token_a_query_permission_and_a_rating(api: TestClient) -> None:
    asked = _ask(api, "How often is the BP-200 serviced?", _auth("carol"))
    assert api.post("/v1/feedback", json={"request_id": asked, "rating": "up"}).status_code == 401
    assert _rate(api, _auth("carol", roles=("readonly",)), asked, "up").status_code == 403
    invalid = _rate(api, _auth("carol"), asked, "meh")
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_request"
    assert _rate(api, _auth("carol"), asked, 2).status_code == 422


def _question(store: StateStore, request_id: str, query_hash: str, answered: bool) -> None:
    store.append_audit("user:ann", "query", "api", "answered" if answered else "no_results",
                       request_id, {"query_hash": query_hash, "doc_ids": ["leave.md"]
                                    if answered else []})


def test_the_summary_counts_answers_and_ranks_questions_by_negative_feedback(
        store: StateStore) -> None:
    _question(store, "r1", "a" * 64, True)
    _question(store, "r2", "b" * 64, True)
    _question(store, "r3", "b" * 64, True)  # the same question again
    _question(store, "r4", "c" * 64, False)
    for request_id, rating in (("r1", 1), ("r2", -1), ("r3", -1), ("r4", -1), ("r1", 1)):
        store.record_feedback(request_id, "user:ann", rating, "why" if rating < 0 else None)

    summary = summarise_feedback(store, window_h=24)
    assert (summary.questions, summary.answered, summary.empty) == (4, 3, 1)
    assert (summary.answer_rate, summary.empty_rate, summary.positive_ratio) == (0.75, 0.25, 0.4)
    assert [(w["question"], w["down"], w["comments"]) for w in summary.worst] == [
        ("b" * 12, 2, 2), ("c" * 12, 1, 1)]
    markdown = feedback_markdown(summary)
    assert "| answer rate (at least one source) | 75.0% |" in markdown
    assert "| positive feedback ratio | 40.0% |" in markdown
    later = summarise_feedback(store, window_h=1, now=utcnow() + timedelta(hours=2))
    assert (later.questions, later.up + later.down, later.answer_rate) == (0, 0, None)
    assert "No negative feedback in this window." in feedback_markdown(later)


def test_the_daily_flow_publishes_the_summary_as_an_artifact(
        api: TestClient, corpus: FolderSource) -> None:
    from flows.evaluate import summarise_feedback as summarise_feedback_flow

    asked = _ask(api, "How many days of annual leave do we get?", _auth("dora"))
    assert _rate(api, _auth("dora"), asked, "down").status_code == 201
    state = summarise_feedback_flow(window_h=24, return_state=True)
    markdown = state.result()
    assert "# Answers and feedback, last 24 h" in markdown
    assert "| empty-result rate |" in markdown and "## Worst questions" in markdown
    # This run's artifact: the key's latest may be another run's on a shared server.
    assert _artifact_of(state.state_details.flow_run_id, "feedback-summary") == markdown


def _artifact_of(flow_run_id: object, key: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return artifact.data
