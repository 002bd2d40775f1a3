"""The HTTP API: permission-aware questions and answers, health, readiness and metrics."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from headwater.auth import (
    QUERY,
    TUNE,
    VIEW_SOURCES,
    AuthError,
    Forbidden,
    caller_from_token,
    permissions,
    require,
)
from headwater.errors import HeadwaterError, IndexUnavailable
from headwater.feedback import router as feedback_router
from headwater.logs import bound_contextvars, get_logger
from headwater.metrics import AnswerMetrics, FeedbackMetrics, FlowMetrics
from headwater.notifications import router as notifications_router
from headwater.records import Caller, QueryRequest, QueryResponse
from headwater.settings import Settings, get_settings
from headwater.state import AuditWriter, StateStore

log = get_logger(__name__)
STATUS_OF = {AuthError: (401, "unauthorized"), Forbidden: (403, "forbidden"),
             IndexUnavailable: (503, "index_unavailable")}


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    retrieval: Histogram
    generation: Histogram
    errors: Counter
    answers: AnswerMetrics

    @classmethod
    def create(cls) -> Metrics:
        # A registry per app, so tests and several apps in one process never collide.
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter("headwater_http_requests_total", "HTTP requests",
                    ["route", "method", "status"], registry=registry),
            Histogram("headwater_http_request_duration_seconds", "HTTP request latency",
                      ["route", "method", "status"], registry=registry),
            Histogram("headwater_retrieval_duration_seconds", "Query embedding and retrieval",
                      registry=registry),
            Histogram("headwater_generation_duration_seconds", "LLM generation, failover included",
                      registry=registry),
            Counter("headwater_errors_total", "Errors by type", ["type"], registry=registry),
            AnswerMetrics.create(registry),
        )


def _error(status: int, code: str, message: str, request_id: str | None = None,
           details: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details is not None:
        body["error"]["details"] = details
    if request_id:
        body["request_id"] = request_id
    return JSONResponse(status_code=status, content=body)


def current_caller(request: Request) -> Caller:
    """The caller named by the request's bearer token (401 when there is none or it is bad)."""
    return caller_from_token(request.app.state.settings, request.headers.get("authorization"))


CurrentCaller = Annotated[Caller, Depends(current_caller)]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics.create()
    state: dict[str, Any] = {}

    def count_objects() -> int:
        from tasks.index import count_chunks

        client = state.get("client")
        if client is None:
            raise IndexUnavailable("the API has not connected to Weaviate yet")
        if not client.collections.exists(settings.collection):
            return 0
        return count_chunks(client, settings.collection)

    # One scrape covers the API and the syncs: their textfiles are read at scrape time.
    metrics.registry.register(FlowMetrics(settings, count_objects))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import torch

        from tasks.answer import generator_for
        from tasks.embed import QueryEncoder, load_embedder
        from tasks.index import connect_index

        torch.set_num_threads(settings.api_torch_threads)
        # Load once per process: the model, one index client and one generator (its breakers).
        # Questions on the index's backend: vectors compare only within one model+backend.
        state["model"] = await run_in_threadpool(
            load_embedder, settings.embedding_model, settings.embedding_backend,
            settings.cache_dir)
        state["encoder"] = QueryEncoder(state["model"])
        state["store"] = StateStore(settings.resolved_state_db_url)
        state["audit"] = AuditWriter(state["store"])
        state["generator"] = generator_for(settings)
        with connect_index(settings) as client:
            state["client"] = client
            yield
        state["encoder"].close()
        state["audit"].close()

    app = FastAPI(title="Headwater", version="0.1.0", lifespan=lifespan,
                  description="Permission-aware answers with citations over company knowledge.")
    app.state.settings = settings
    # What /v1/feedback needs: the store and audit writer (set at startup) and its counters.
    app.state.services = state
    app.state.feedback_metrics = FeedbackMetrics.create(metrics.registry)

    @app.middleware("http")
    async def identify(request: Request, call_next: Any) -> Response:
        request.state.request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        # Every line logged while serving the request carries its id, nested calls included.
        with bound_contextvars(request_id=request.state.request_id):
            return await measure(request, call_next)

    async def measure(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.api_max_body_bytes:
            response: Response = _error(413, "payload_too_large",
                                        f"requests are limited to {settings.api_max_body_bytes}"
                                        " bytes", request.state.request_id)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        labels = (path, request.method, str(response.status_code))
        metrics.requests.labels(*labels).inc()
        metrics.latency.labels(*labels).observe(time.perf_counter() - started)
        log.info("request served", method=request.method, route=path,
                 status=response.status_code,
                 duration_ms=round((time.perf_counter() - started) * 1000, 1))
        response.headers["x-request-id"] = request.state.request_id
        return response

    @app.exception_handler(HeadwaterError)
    async def headwater_error(request: Request, error: HeadwaterError) -> JSONResponse:
        status, code = next(((s, c) for kind, (s, c) in STATUS_OF.items()
                             if isinstance(error, kind)), (500, "internal_error"))
        metrics.errors.labels(type(error).__name__).inc()
        log.warning("request refused", code=code, error=type(error).__name__,
                    detail=error.log_message)
        return _error(status, code, error.user_message, request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.errors.labels("RequestValidationError").inc()
        details = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in error.errors()]
        return _error(422, "invalid_request", "the request body is not valid",
                      request.state.request_id, details)

    app.include_router(notifications_router)
    app.include_router(feedback_router)
    if settings.console_enabled:
        from fastapi.responses import RedirectResponse

        from headwater.console import router as console_router

        app.include_router(console_router)

        @app.get("/", include_in_schema=False)
        def home() -> RedirectResponse:
            return RedirectResponse("/console", status_code=307)

    @app.post("/v1/query", response_model=QueryResponse,
              responses={401: {}, 403: {}, 413: {}, 422: {}, 503: {}})
    def query(body: QueryRequest, request: Request,
              who: CurrentCaller) -> Any:
        """Answer a question from the documents the caller may read, with citations."""
        from tasks.answer import answer_question, record_query

        require(who, QUERY)
        tuned = body.alpha is not None or body.mmr or body.top_k > 10
        if tuned:
            require(who, TUNE)
        response, trace = answer_question(settings, body, who, state["client"], state["encoder"],
                                          state["generator"], request.state.request_id)
        metrics.retrieval.observe(trace.retrieval_s)
        metrics.answers.observe(len(response.sources))
        if trace.generation_s:
            metrics.generation.observe(trace.generation_s)
        record_query(state["audit"], who, body, response, trace, channel="api")
        if VIEW_SOURCES not in permissions(who):
            response.sources = []
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Weaviate answers, the state DB answers, and the model is loaded."""
        checks: dict[str, str] = {"model": "ok" if state.get("model") is not None else "missing"}
        try:
            checks["weaviate"] = "ok" if state["client"].is_ready() else "not ready"
        except Exception as error:  # any failure to answer is "not ready", reported, not raised
            checks["weaviate"] = f"error: {type(error).__name__}"
        try:
            with state["store"].engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["state_db"] = "ok"
        except Exception as error:
            checks["state_db"] = f"error: {type(error).__name__}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(status_code=200 if ready else 503,
                            content={"status": "ready" if ready else "not ready", **checks})

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
