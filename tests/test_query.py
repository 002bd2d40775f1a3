"""Answering questions: each caller sees only what they may read, through every door."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from conftest import FolderSource, bearer, synced_corpus
from fastapi.testclient import TestClient

from flows.query import answer_query
from headwater.api import create_app
from headwater.settings import LLMEndpoint, Settings
from tasks.answer import NOTHING_FOUND

HEADWATER = str(Path(sys.executable).parent / "headwater")
SECRET = "test-signing-secret-of-enough-length"

HR_ONLY = "hr/salary-bands.md"
ENG_ONLY = "eng/deploy-telemetry.md"
PUBLIC = "public/bp-200.md"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, local_stack) -> Iterator[FolderSource]:
    """One small corpus, synced once, read by every test of this module."""
    with synced_corpus(tmp_path_factory.mktemp("corpus"), "TestQuery", {
        HR_ONLY: "# Salary bands\n\nEngineers in band B3 earn between 61,000 and 75,000 euros. "
                 "Salary bands are reviewed every March.\n",
        ENG_ONLY: "# Deploying telemetry\n\nDeploy the pump telemetry service with the release "
                  "pipeline, then watch the error dashboard.\n",
        PUBLIC: "# BP-200 pump\n\nThe BP-200 pump moves 200 litres of water per minute and is "
                "serviced once a year.\n",
        "leave.md": "# Annual leave\n\nEvery employee has 25 days of annual leave per year.\n",
    }, principals={"": ["group:hr", "group:engineering"], "hr/": ["group:hr"],
                   "eng/": ["group:engineering"], "public/": ["public"]},
            jwt_secret=SECRET) as source:
        yield source


def _token(sub: str, groups: list[str], roles: list[str] | None = None, **extra: object) -> str:
    return bearer(SECRET, sub, groups, roles, **extra)


@pytest.fixture(scope="module")
def api(corpus: FolderSource) -> Iterator[TestClient]:
    with TestClient(create_app(corpus.settings)) as client:
        yield client


def _ask(api: TestClient, question: str, token: str | None, **body: object):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return api.post("/v1/query", json={"question": question, **body}, headers=headers)


ALICE = ("alice", ["hr"])
BOB = ("bob", ["engineering"])
# A question that touches every document, and what each user may be shown of them.
EVERYTHING = "salary bands, deploying telemetry, the BP-200 pump and annual leave"
ALLOWED = {"alice": {HR_ONLY, "leave.md", PUBLIC}, "bob": {ENG_ONLY, "leave.md", PUBLIC}}
SECRETS = {"alice": ["61,000", "75,000"], "bob": ["release pipeline", "error dashboard"]}


def _assert_only_allowed(user: str, answer: dict) -> None:
    """The user sees their documents and public ones, never the other user's, anywhere."""
    shown = {s["doc_id"] for s in answer["sources"]}
    assert PUBLIC in shown and shown <= ALLOWED[user], (user, shown)
    other = "bob" if user == "alice" else "alice"
    assert not any(secret in json.dumps(answer) for secret in SECRETS[other])


def test_through_the_api_neither_user_sees_the_others_documents(api: TestClient) -> None:
    alice = _ask(api, "What do engineers earn in salary band B3?", _token(*ALICE)).json()
    assert "sources" in alice, alice
    assert HR_ONLY in [s["doc_id"] for s in alice["sources"]]
    assert "61,000" in alice["answer"]

    bob = _ask(api, "What do engineers earn in salary band B3?", _token(*BOB)).json()
    assert HR_ONLY not in [s["doc_id"] for s in bob["sources"]]
    assert "61,000" not in bob["answer"] and "61,000" not in json.dumps(bob)
    bob_deploy = _ask(api, "How do I deploy the telemetry service?", _token(*BOB)).json()
    assert bob_deploy["sources"][0]["doc_id"] == ENG_ONLY

    alice_deploy = _ask(api, "How do I deploy the telemetry service?", _token(*ALICE)).json()
    assert ENG_ONLY not in json.dumps(alice_deploy)
    for who in (ALICE, BOB):
        _assert_only_allowed(who[0], _ask(api, EVERYTHING, _token(*who), top_k=10).json())


def test_a_public_document_is_seen_by_both(api: TestClient) -> None:
    for who in (ALICE, BOB):
        answer = _ask(api, "How many litres per minute does the BP-200 move?",
                      _token(*who)).json()
        assert answer["sources"][0]["doc_id"] == PUBLIC
        assert "200 litres" in answer["answer"]
        assert answer["answered_by"] == "extractive"
        assert "[1]" in answer["answer"]


def test_an_answer_carries_citations_timing_and_a_request_id(api: TestClient) -> None:
    response = _ask(api, "How many days of annual leave?", _token(*ALICE))
    body = response.json()
    assert body["sources"][0] == {**body["sources"][0], "n": 1, "doc_id": "leave.md",
                                  "source": "handbook"}
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["processing_time_ms"] > 0 and 0 < body["confidence"] <= 1


def test_through_the_cli_and_the_flow_permissions_hold(corpus: FolderSource) -> None:
    env = {**os.environ, **corpus.env}
    asked = subprocess.run([HEADWATER, "ask", "--as", "bob", "--groups", "engineering", "--json",
                            "What do engineers earn in salary band B3?"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert asked.returncode == 0, asked.stderr
    assert HR_ONLY not in asked.stdout and "61,000" not in asked.stdout
    for user, group in (("alice", "hr"), ("bob", "engineering")):
        asked = subprocess.run([HEADWATER, "ask", "--as", user, "--groups", group, "--json",
                                "--top-k", "10", EVERYTHING],
                               capture_output=True, text=True, env=env, timeout=300)
        assert asked.returncode == 0, asked.stderr
        _assert_only_allowed(user, json.loads(asked.stdout))

    result = answer_query("What do engineers earn in salary band B3?",
                          principals=["user:alice", "group:hr"])
    assert result["sources"][0]["doc_id"] == HR_ONLY
    for user, principals in (("alice", ["user:alice", "group:hr"]),
                             ("bob", ["user:bob", "group:engineering"])):
        _assert_only_allowed(user, answer_query(EVERYTHING, principals=principals, top_k=10))
    nobody = answer_query("What do engineers earn in salary band B3?")
    assert {s["doc_id"] for s in nobody["sources"]} <= {PUBLIC}


def test_a_caller_without_identity_sees_only_public_documents(corpus: FolderSource) -> None:
    settings = corpus.settings.model_copy(update={"api_allow_anonymous": True})
    with TestClient(create_app(settings)) as client:
        body = _ask(client, "annual leave days salary band telemetry pump", None).json()
    assert [s["doc_id"] for s in body["sources"]] == [PUBLIC]


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("no token", 401, "unauthorized"),
        ("garbage token", 401, "unauthorized"),
        ("expired token", 401, "unauthorized"),
        ("wrong audience", 401, "unauthorized"),
        ("wrong signature", 401, "unauthorized"),
        ("readonly role", 403, "forbidden"),
        ("user tuning alpha", 403, "forbidden"),
        ("empty question", 422, "invalid_request"),
        ("oversized body", 413, "payload_too_large"),
    ],
)
def test_each_error_is_a_json_error_with_a_stable_code(
    api: TestClient, case: str, status: int, code: str
) -> None:
    question, headers, body = "annual leave", {}, {}
    token = {
        "no token": None,
        "garbage token": "not-a-jwt",
        "expired token": _token("alice", ["hr"], exp=int(time.time()) - 10),
        "wrong audience": _token("alice", ["hr"], aud="another-service"),
        "wrong signature": jwt.encode(
            {"sub": "x", "aud": "headwater", "exp": int(time.time()) + 60},
            "another-secret-of-a-proper-length-too", algorithm="HS256"),
        "readonly role": _token("carol", ["hr"], roles=["readonly"]),
        "user tuning alpha": _token("alice", ["hr"]),
    }.get(case, _token("alice", ["hr"]))
    if case == "user tuning alpha":
        body = {"alpha": 0.9}
    if case == "empty question":
        question = ""
    if case == "oversized body":
        question = "x" * 70_000
    if token:
        headers["Authorization"] = f"Bearer {token}"
    response = api.post("/v1/query", json={"question": question, **body}, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_a_power_user_may_tune_retrieval(api: TestClient) -> None:
    response = _ask(api, "pump", _token("dana", ["hr"], roles=["power_user"]), alpha=0.0,
                    mmr=True, top_k=3)
    assert response.status_code == 200, response.text


def test_health_readiness_openapi_and_metrics(api: TestClient) -> None:
    _ask(api, "annual leave", _token(*ALICE))
    _ask(api, "annual leave", None)
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz").json()
    assert ready == {"status": "ready", "model": "ok", "weaviate": "ok", "state_db": "ok"}
    assert "/v1/query" in api.get("/openapi.json").json()["paths"]
    metrics = api.get("/metrics").text
    for series in ('headwater_http_requests_total{method="POST",route="/v1/query",status="200"}',
                   'headwater_http_requests_total{method="POST",route="/v1/query",status="401"}',
                   "headwater_http_request_duration_seconds_bucket",
                   "headwater_retrieval_duration_seconds_count",
                   "headwater_generation_duration_seconds",
                   'headwater_errors_total{type="AuthError"}'):
        assert series in metrics, series


def test_every_query_is_written_to_the_audit_trail(api: TestClient, corpus: FolderSource) -> None:
    response = _ask(api, "How many days of annual leave?", _token(*ALICE)).json()
    entries = corpus.store.audit_entries("query")
    entry = next(e for e in entries if e.request_id == response["request_id"])
    assert entry.actor == "user:alice" and entry.resource == "api"
    assert entry.details["doc_ids"] == [s["doc_id"] for s in response["sources"]]
    assert "annual" not in json.dumps(entry.details)  # the question is stored as a hash only
    assert len(entry.details["query_hash"]) == 64


class _StandIn(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that is slow, broken or helpful, as its server is told."""

    def do_POST(self) -> None:
        behaviour = self.server.behaviour  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if behaviour == "slow":
            time.sleep(3)
        if behaviour in ("slow", "broken"):
            self.send_response(500)
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"role": "assistant",
                                                    "content": "Leave is 25 days a year [1]."}}]})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_ins() -> Iterator[dict[str, str]]:
    servers = {}
    for behaviour in ("slow", "broken", "helpful"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
        server.behaviour = behaviour  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[behaviour] = server
    yield {b: f"http://127.0.0.1:{s.server_address[1]}/v1" for b, s in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def test_generation_fails_over_to_the_endpoint_that_answers(
    corpus: FolderSource, stand_ins: dict[str, str]
) -> None:
    endpoints = [LLMEndpoint(name=b, base_url=stand_ins[b], model="m", timeout_s=0.5)
                 for b in ("slow", "broken", "helpful")]
    settings = corpus.settings.model_copy(update={"llm_endpoints": endpoints, "llm_retries": 0})
    with TestClient(create_app(settings)) as client:
        body = _ask(client, "How many days of annual leave?", _token(*ALICE)).json()
    assert body["answer"] == "Leave is 25 days a year [1]."
    assert body["answered_by"].startswith("helpful")


def test_with_every_endpoint_down_the_answer_is_extractive(
    corpus: FolderSource, stand_ins: dict[str, str]
) -> None:
    endpoints = [LLMEndpoint(name=b, base_url=stand_ins[b], model="m", timeout_s=0.5)
                 for b in ("slow", "broken")]
    settings = corpus.settings.model_copy(update={"llm_endpoints": endpoints, "llm_retries": 0})
    with TestClient(create_app(settings)) as client:
        body = _ask(client, "How many days of annual leave?", _token(*ALICE)).json()
    assert body["answered_by"] == "extractive"
    assert "25 days" in body["answer"] and "[1]" in body["answer"]


def test_nothing_readable_gives_an_honest_empty_answer(api: TestClient) -> None:
    body = _ask(api, "zebra quantum saxophone", _token("erin", ["nobody"])).json()
    assert body["sources"] == [] or all(s["doc_id"] == PUBLIC for s in body["sources"])
    if not body["sources"]:
        assert body["answer"] == NOTHING_FOUND


def test_through_the_deployment_the_answer_respects_the_principals(
    corpus: FolderSource, settings: Settings
) -> None:
    from prefect.deployments import run_deployment
    from test_prefect import _delete_deployment

    from headwater.settings import PROJECT_ROOT

    deployment_id = answer_query.from_source(
        source=str(PROJECT_ROOT), entrypoint="flows/query.py:answer_query"
    ).deploy(name=f"test-{uuid.uuid4().hex[:8]}", work_pool_name=settings.work_pool,
             job_variables={"env": corpus.env}, print_next_steps=False)
    try:
        runs = {
            who: run_deployment(deployment_id, timeout=240, parameters={
                "question": EVERYTHING, "principals": principals, "top_k": 10})
            for who, principals in (("alice", ["user:alice", "group:hr"]),
                                    ("bob", ["user:bob", "group:engineering"]))
        }
    finally:
        import asyncio

        asyncio.run(_delete_deployment(deployment_id))
    for who, run in runs.items():
        _assert_only_allowed(who, run.state.result())


def test_rs256_tokens_are_verified_against_the_jwks_file(
    corpus: FolderSource, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    settings = corpus.settings.model_copy(update={"jwt_jwks_file": jwks, "jwt_secret": None})
    claims = {"sub": "alice", "groups": ["hr"], "roles": ["user"], "aud": "headwater",
              "exp": int(time.time()) + 60}
    good = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": "k1"})
    unknown_kid = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k9"})
    with TestClient(create_app(settings)) as client:
        assert _ask(client, "annual leave", good).status_code == 200
        assert _ask(client, "annual leave", forged).status_code == 401
        assert _ask(client, "annual leave", unknown_kid).status_code == 401
        # An HS256 token is refused when only RS256 is configured.
        assert _ask(client, "annual leave", _token(*ALICE)).status_code == 401
