"""Answer generation fails over between real local HTTP endpoints within one deadline."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from headwater.settings import LLMEndpoint
from tasks.generate import (
    CircuitBreaker,
    Generator,
    NumberedSource,
    build_messages,
)

ANSWER = "Leave is 25 days [1]"
SOURCES = [
    NumberedSource(1, "Leave policy", "Every employee has 25 days of annual leave."),
    NumberedSource(2, "Expenses", "Receipts are needed for claims over 20 EUR."),
]
QUESTION = "How many days of leave do I get?"


class StubLLM(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint whose behaviour a test sets and can change.

    "ok" answers, "slow" answers only after `slow_s`, "error" returns 500, "bad request"
    returns 400, "empty" answers with empty content, "no choices" with no choices, "throttle"
    returns 429 with Retry-After once and then answers.
    """

    def __init__(self, behaviour: str, retry_after: str = "0", slow_s: float = 10.0) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.requests: list[dict[str, object]] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def endpoint(self, name: str, timeout_s: float = 2.0, **fields: object) -> LLMEndpoint:
        return LLMEndpoint(
            name=name, base_url=self.base_url, model=f"{name}-model", timeout_s=timeout_s,
            **fields,
        )

    def record(self, request: dict[str, object]) -> int:
        with self._lock:
            self.requests.append(request)
            return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    server: StubLLM

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output quiet

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen = self.server.record(
            {"path": self.path, "headers": dict(self.headers), "body": body}
        )
        behaviour = self.server.behaviour
        if behaviour == "slow":
            # Waits on the stop event so shutting the server down never waits out the sleep.
            if self.server.stopping.wait(self.server.slow_s):
                return
            self._reply(200, _completion(body["model"], ANSWER))
        elif behaviour == "error":
            self._reply(500, {"error": {"message": "model crashed"}})
        elif behaviour == "bad request":
            self._reply(400, {"error": {"message": "unknown parameter"}})
        elif behaviour == "empty":
            self._reply(200, _completion(body["model"], ""))
        elif behaviour == "no choices":
            self._reply(200, {"id": "chatcmpl-test", "object": "chat.completion", "choices": []})
        elif behaviour == "throttle" and seen == 1:
            self._reply(429, {"error": {"message": "slow down"}},
                        {"Retry-After": self.server.retry_after})
        else:
            self._reply(200, _completion(body["model"], ANSWER))

    def _reply(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and left, which is what some tests want


def _completion(model: str, content: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


@pytest.fixture
def llm_server() -> Iterator[Callable[..., StubLLM]]:
    """Starts stub endpoints on free loopback ports; all are shut down after the test."""
    started: list[StubLLM] = []

    def start(behaviour: str, **options: object) -> StubLLM:
        server = StubLLM(behaviour, **options)  # type: ignore[arg-type]
        # A short poll interval: shutdown() waits up to one interval per server.
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # No proxies from the environment: the stubs are on loopback.
    with httpx.Client(trust_env=False) as c:
        yield c


def refused_endpoint(name: str) -> LLMEndpoint:
    """An endpoint on a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return LLMEndpoint(name=name, base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=1)


def outcomes(answer_attempts: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(a["endpoint"], a["outcome"]) for a in answer_attempts]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_prompt_numbers_the_sources_and_asks_for_citations() -> None:
    system, user = build_messages(QUESTION, SOURCES)

    assert system["role"] == "system"
    assert "only from the numbered sources" in system["content"]
    assert "[1]" in system["content"]
    assert "do not know" in system["content"]
    assert user["role"] == "user"
    assert "[1] Leave policy\nEvery employee has 25 days of annual leave." in user["content"]
    assert "[2] Expenses\nReceipts are needed for claims over 20 EUR." in user["content"]
    assert user["content"].index("[1] Leave") < user["content"].index("[2] Expenses")
    assert user["content"].endswith(f"Question: {QUESTION}")


def test_the_request_is_an_openai_chat_completion_at_temperature_zero(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    server = llm_server("ok")
    generator = Generator([server.endpoint("local")], client=client)

    answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None
    assert answer.text == ANSWER
    assert answer.answered_by == "local/local-model"
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {
        "model": "local-model",
        "messages": build_messages(QUESTION, SOURCES),
        "temperature": 0,
    }
    assert "authorization" not in {h.lower() for h in request["headers"]}


def test_first_endpoint_times_out_second_fails_third_answers(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    slow, broken, healthy = llm_server("slow"), llm_server("error"), llm_server("ok")
    generator = Generator(
        [slow.endpoint("slow", timeout_s=0.5), broken.endpoint("broken"),
         healthy.endpoint("healthy")],
        deadline_s=5, retries=1, client=client,
    )

    answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None
    assert answer.text == ANSWER
    assert answer.answered_by == "healthy/healthy-model"
    assert outcomes(answer.attempts) == [
        ("slow", "timeout"), ("slow", "timeout"),
        ("broken", "http 500"), ("broken", "http 500"),
        ("healthy", "ok"),
    ]
    assert all(a["elapsed_ms"] >= 400 for a in answer.attempts[:2])


def test_all_endpoints_down_returns_none(
    llm_server: Callable[..., StubLLM], client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    broken = llm_server("error")
    generator = Generator([refused_endpoint("gone"), broken.endpoint("broken")], client=client)

    with caplog.at_level(logging.WARNING, logger="headwater.generate"):
        answer = generator.generate(QUESTION, SOURCES)

    assert answer is None  # the caller answers extractively
    assert len(broken.requests) == 2
    assert "gone (m) attempt 1 of 2 failed: connect error" in caplog.text
    assert "broken (broken-model) attempt 2 of 2 failed: http 500" in caplog.text


def test_failover_never_exceeds_the_overall_deadline(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    servers = [llm_server("slow") for _ in range(3)]
    generator = Generator(
        [s.endpoint(f"slow{i}", timeout_s=5) for i, s in enumerate(servers)],
        deadline_s=1.5, retries=1, client=client,
    )

    started = time.monotonic()
    answer = generator.generate(QUESTION, SOURCES)
    elapsed = time.monotonic() - started

    assert answer is None
    assert elapsed < 2.0
    # The first endpoint's one call used up the deadline: no retry, nothing left to fail over to.
    assert [len(s.requests) for s in servers] == [1, 0, 0]


def test_an_endpoint_that_keeps_failing_is_skipped_by_the_circuit_breaker(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    flaky, healthy = llm_server("error"), llm_server("ok")
    clock = FakeClock()
    generator = Generator(
        [flaky.endpoint("flaky"), healthy.endpoint("healthy")],
        retries=0, breaker_failures=2, breaker_reset_s=60, client=client, clock=clock,
    )

    for _ in range(2):
        answer = generator.generate(QUESTION, SOURCES)
        assert answer is not None and answer.answered_by == "healthy/healthy-model"
    assert len(flaky.requests) == 2
    assert generator.breakers["flaky"].state == "open"

    answer = generator.generate(QUESTION, SOURCES)
    assert answer is not None
    assert outcomes(answer.attempts) == [("flaky", "circuit open"), ("healthy", "ok")]
    assert len(flaky.requests) == 2  # not contacted while open

    clock.now += 59
    generator.generate(QUESTION, SOURCES)
    assert len(flaky.requests) == 2

    clock.now += 1
    flaky.behaviour = "ok"  # it recovered in the meantime
    answer = generator.generate(QUESTION, SOURCES)
    assert answer is not None
    assert answer.answered_by == "flaky/flaky-model"
    assert len(flaky.requests) == 3
    assert generator.breakers["flaky"].state == "closed"


def test_a_failed_half_open_trial_reopens_the_circuit_and_allows_only_one_trial() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, reset_s=10, clock=clock)
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()

    clock.now += 10
    assert breaker.state == "half-open"
    assert breaker.allow()
    assert not breaker.allow()  # a second caller waits for the trial's result
    breaker.record_failure()
    assert breaker.state == "open"

    clock.now += 10
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_throttled_endpoint_is_retried_after_retry_after(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    throttled = llm_server("throttle", retry_after="0.25")
    waits: list[float] = []
    generator = Generator(
        [throttled.endpoint("throttled")], retries=1, client=client, sleep=waits.append
    )

    answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None and answer.answered_by == "throttled/throttled-model"
    assert outcomes(answer.attempts) == [("throttled", "http 429"), ("throttled", "ok")]
    assert waits == [0.25]
    assert len(throttled.requests) == 2


def test_a_retry_after_beyond_the_deadline_moves_on_to_the_next_endpoint(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    throttled, healthy = llm_server("throttle", retry_after="120"), llm_server("ok")
    waits: list[float] = []
    generator = Generator(
        [throttled.endpoint("throttled"), healthy.endpoint("healthy")],
        deadline_s=5, retries=3, client=client, sleep=waits.append,
    )

    answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None and answer.answered_by == "healthy/healthy-model"
    assert outcomes(answer.attempts) == [("throttled", "http 429"), ("healthy", "ok")]
    assert waits == []


def test_client_errors_are_not_retried(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    rejecting, healthy = llm_server("bad request"), llm_server("ok")
    generator = Generator(
        [rejecting.endpoint("rejecting"), healthy.endpoint("healthy")], retries=3, client=client
    )

    answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None and answer.answered_by == "healthy/healthy-model"
    assert len(rejecting.requests) == 1
    assert outcomes(answer.attempts) == [("rejecting", "http 400"), ("healthy", "ok")]


def test_an_empty_or_malformed_completion_is_a_failure(
    llm_server: Callable[..., StubLLM], client: httpx.Client
) -> None:
    empty, shapeless, healthy = llm_server("empty"), llm_server("no choices"), llm_server("ok")
    generator = Generator(
        [empty.endpoint("empty"), shapeless.endpoint("shapeless"), healthy.endpoint("healthy")],
        retries=1, client=client,
    )

    answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None and answer.answered_by == "healthy/healthy-model"
    assert outcomes(answer.attempts) == [
        ("empty", "empty answer"),
        ("shapeless", "bad response (no choices[0].message.content)"),
        ("healthy", "ok"),
    ]


def test_api_key_is_sent_as_bearer_and_a_missing_key_variable_fails_over(
    llm_server: Callable[..., StubLLM],
    client: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unkeyed, keyed = llm_server("error"), llm_server("ok")
    monkeypatch.delenv("HEADWATER_TEST_MISSING_KEY", raising=False)
    monkeypatch.setenv("HEADWATER_TEST_LLM_KEY", "sk-test-secret-123")
    generator = Generator(
        [unkeyed.endpoint("unkeyed", api_key_env="HEADWATER_TEST_MISSING_KEY"),
         keyed.endpoint("keyed", api_key_env="HEADWATER_TEST_LLM_KEY")],
        client=client,
    )

    with caplog.at_level(logging.DEBUG):
        answer = generator.generate(QUESTION, SOURCES)

    assert answer is not None and answer.answered_by == "keyed/keyed-model"
    assert outcomes(answer.attempts) == [
        ("unkeyed", "missing api key ($HEADWATER_TEST_MISSING_KEY is not set)"),
        ("keyed", "ok"),
    ]
    assert unkeyed.requests == []
    (request,) = keyed.requests
    assert request["headers"]["Authorization"] == "Bearer sk-test-secret-123"
    assert "sk-test-secret-123" not in caplog.text
