"""The web console at /console: ask, sources, quarantine, privacy requests and the audit trail."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from headwater.auth import (
    ADMIN,
    PRIVACY,
    QUERY,
    ROLE_PERMISSIONS,
    VIEW_SOURCES,
    AuthError,
    Forbidden,
    permissions,
    require,
)
from headwater.console import rows, runs
from headwater.console.session import (
    CSRF_FIELD,
    SignInRequired,
    caller_of,
    check_csrf,
    csrf_token,
    dev_login_offered,
    dev_token,
    end_session,
    keep_csrf,
    start_session,
)
from headwater.errors import HeadwaterError, IndexUnavailable
from headwater.logs import get_logger
from headwater.records import Caller
from headwater.settings import Settings
from headwater.state import StateStore

log = get_logger(__name__)
HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda t: f"{t:%Y-%m-%d %H:%M} UTC" if t else "-"
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
# Page, address and the permission that shows it in the navigation.
NAVIGATION = [("Ask", "/console/ask", QUERY), ("Sources", "/console/sources", VIEW_SOURCES),
              ("Quarantine", "/console/quarantine", VIEW_SOURCES),
              ("Privacy", "/console/privacy", PRIVACY), ("Audit", "/console/audit", PRIVACY)]
REQUEST_KINDS = ("access", "erasure")
AUDIT_PAGE = 50


def _render(request: Request, template: str, status_code: int = 200,
            **context: Any) -> Response:
    caller: Caller | None = getattr(request.state, "console_caller", None)
    granted = permissions(caller) if caller else frozenset()
    response = templates.TemplateResponse(request, template, status_code=status_code, context={
        "caller": caller, "granted": granted, "ADMIN": ADMIN, "csrf_field": CSRF_FIELD,
        "csrf": csrf_token(request), "path": request.url.path,
        "navigation": [(label, href) for label, href, needs in NAVIGATION if needs in granted],
        **context})
    keep_csrf(request, response)
    return response


def _see_other(url: str, **query: str) -> RedirectResponse:
    return RedirectResponse(url + (f"?{urlencode(query)}" if query else ""), status_code=303)


def _actor(caller: Caller | None) -> str:
    return f"user:{caller.user_id}" if caller and caller.user_id else "anonymous"


def _audit(request: Request, caller: Caller | None, action: str, resource: str, outcome: str,
           details: dict | None = None) -> None:
    request.app.state.services["audit"].append_audit(
        _actor(caller), action, resource, outcome, request.state.request_id, details)


class ConsoleRoute(APIRoute):
    """Console routes answer in pages: no session is a redirect to sign-in, a refusal a 403
    page (audited), any other Headwater error a page saying what went wrong."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired as missing:
                log.info("console sign-in required", detail=missing.log_message)
                return _see_other("/console/sign-in")
            except Forbidden as refused:
                log.warning("console action refused", path=request.url.path,
                            detail=refused.log_message)
                if getattr(request.state, "console_caller", None) or request.method == "POST":
                    await run_in_threadpool(
                        _audit, request, getattr(request.state, "console_caller", None),
                        "console.refused", f"{request.method} {request.url.path}", "forbidden",
                        {"reason": refused.user_message})
                return _render(request, "refused.html", 403, title="Not allowed",
                               message=refused.user_message)
            except HeadwaterError as error:
                status = (409 if isinstance(error, runs.NotDeployed) else
                          503 if isinstance(error, IndexUnavailable) else 400)
                log.warning("console action failed", path=request.url.path,
                            error=type(error).__name__, detail=error.log_message)
                return _render(request, "refused.html", status, title="That did not work",
                               message=error.user_message)

        return guarded


router = APIRouter(prefix="/console", route_class=ConsoleRoute, include_in_schema=False)


def _caller(request: Request) -> Caller:
    caller = caller_of(request.app.state.settings, request)
    request.state.console_caller = caller
    return caller


@dataclass
class Posted:
    """A submitted form (URL-encoded: every console form is), its CSRF token checked."""

    fields: dict[str, list[str]]

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1].strip() if values else default

    def all(self, name: str) -> list[str]:
        return [v.strip() for v in self.fields.get(name, []) if v.strip()]


async def _posted(request: Request) -> Posted:
    body = (await request.body()).decode("utf-8", "replace")
    posted = Posted(parse_qs(body, keep_blank_values=True))
    check_csrf(request, posted.get(CSRF_FIELD))
    return posted


Who = Annotated[Caller, Depends(_caller)]
Form = Annotated[Posted, Depends(_posted)]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _services(request: Request) -> dict[str, Any]:
    return request.app.state.services


def _store(request: Request) -> StateStore:
    return _services(request)["store"]


# -- signing in and out ------------------------------------------------------------------------


@router.get("")
@router.get("/")
def home(request: Request) -> Response:
    try:
        granted = permissions(_caller(request))
    except SignInRequired:
        return _see_other("/console/sign-in")
    first = next((href for _, href, needs in NAVIGATION if needs in granted), None)
    return _see_other(first or "/console/sign-in")


def _sign_in_page(request: Request, status_code: int = 200, error: str | None = None
                  ) -> Response:
    return _render(request, "sign_in.html", status_code, title="Sign in", error=error,
                   dev_login=dev_login_offered(_settings(request), request),
                   roles=sorted(ROLE_PERMISSIONS))


@router.get("/sign-in")
def sign_in_page(request: Request) -> Response:
    return _sign_in_page(request)


@router.post("/sign-in")
def sign_in(request: Request, form: Form) -> Response:
    response = _see_other("/console")
    try:
        caller = start_session(_settings(request), request, response, form.get("token"))
    except AuthError as error:
        _audit(request, None, "console.sign_in", "console", "refused",
               {"reason": error.user_message})
        return _sign_in_page(request, 401, f"That token was not accepted: {error.user_message}")
    _audit(request, caller, "console.sign_in", "console", "ok", {"roles": caller.roles})
    return response


@router.post("/dev-login")
def dev_login(request: Request, form: Form) -> Response:
    settings = _settings(request)
    groups = [g.strip() for g in form.get("groups").split(",") if g.strip()]
    roles = [r for r in form.all("roles") if r in ROLE_PERMISSIONS]
    token = dev_token(settings, request, form.get("user_id"), groups, roles)
    response = _see_other("/console")
    caller = start_session(settings, request, response, token)
    _audit(request, caller, "console.dev_login", "console", "ok",
           {"groups": groups, "roles": roles})
    return response


@router.post("/sign-out")
def sign_out(request: Request, who: Who, form: Form) -> Response:
    response = _see_other("/console/sign-in")
    end_session(request, response)
    _audit(request, who, "console.sign_out", "console", "ok")
    return response


# -- ask -------------------------------------------------------------------------------------


@router.get("/ask")
def ask_page(request: Request, who: Who, rated: str = "") -> Response:
    require(who, QUERY)
    notice = "Thank you: your rating was recorded." if rated in ("up", "down") else None
    return _render(request, "ask.html", title="Ask", question="", answer=None, notice=notice)


@router.post("/ask")
def ask(request: Request, who: Who, form: Form) -> Response:
    """The same path as POST /v1/query: retrieval within the caller's permissions, the same
    answer, the same audit entry (channel `console`)."""
    from headwater.records import QueryRequest
    from tasks.answer import answer_question, record_query

    require(who, QUERY)
    question = form.get("question")
    try:
        body = QueryRequest(question=question)
    except ValidationError:
        return _render(request, "ask.html", 422, title="Ask", question=question, answer=None,
                       error="Type a question of at most 2,000 characters.")
    services = _services(request)
    response, trace = answer_question(_settings(request), body, who, services["client"],
                                      services["encoder"], services["generator"],
                                      request.state.request_id)
    record_query(services["audit"], who, body, response, trace, channel="console")
    if VIEW_SOURCES not in permissions(who):
        response.sources = []
    return _render(request, "ask.html", title="Ask", question=question, answer=response,
                   cited=rows.cited_answer(response),
                   dates=rows.source_dates(_store(request), response))


@router.post("/feedback")
async def rate(request: Request, who: Who, form: Form) -> Response:
    """Recorded by the API's own feedback endpoint function: stored, audited, counted."""
    from headwater.feedback import FeedbackRequest, feedback

    try:
        body = FeedbackRequest(request_id=form.get("request_id"), rating=form.get("rating"))
    except ValidationError:
        return _render(request, "refused.html", 422, title="That did not work",
                       message="A rating is up or down, for an answer you were given.")
    receipt = await feedback(body, request, who)
    if isinstance(receipt, Response):
        return _render(request, "refused.html", 404, title="That did not work",
                       message="No answer with this request id was given to you.")
    return _see_other("/console/ask", rated=body.rating)


# -- sources ---------------------------------------------------------------------------------


def _chunk_counts(request: Request, names: list[str]) -> dict[str, int]:
    from tasks.index import count_chunks

    client, collection = _services(request)["client"], _settings(request).collection
    if not client.collections.exists(collection):
        return {}
    return {name: count_chunks(client, collection, name) for name in names}


def _prefect_or_nothing(read: Callable[[], Any], empty: Any) -> tuple[Any, str | None]:
    """Prefect's answer, or nothing and why: a page still shows what the state store knows."""
    try:
        return read(), None
    except Exception as error:  # Prefect unreachable or refusing: said on the page
        log.warning("prefect unreadable", error=repr(error))
        return empty, f"The Prefect server could not be read ({type(error).__name__})."


@router.get("/sources")
def sources_page(request: Request, who: Who, run: str = "") -> Response:
    from headwater.config import load_sources
    from headwater.health import last_successes
    from headwater.state import utcnow

    require(who, VIEW_SOURCES)
    settings = _settings(request)
    sources = load_sources(settings.config)
    deployments, trouble = _prefect_or_nothing(lambda: runs.sync_deployments(settings), {})
    started, _ = _prefect_or_nothing(
        lambda: runs.flow_run(settings, run) if run and not trouble else None, None)
    health = rows.source_health(settings, sources.values(), _store(request),
                                last_successes(settings), _chunk_counts(request, list(sources)),
                                deployments, utcnow())
    return _render(request, "sources.html", title="Sources", sources=health, started=started,
                   trouble=trouble, may_sync=ADMIN in permissions(who))


def _start_sync(request: Request, who: Caller, source: str, action: str,
                resource: str) -> runs.RunState:
    from headwater.config import load_sources

    settings = _settings(request)
    if source not in load_sources(settings.config):
        raise HeadwaterError(f"there is no source named {source!r}")
    try:
        started = runs.start_sync(settings, source)
    except runs.NotDeployed:
        _audit(request, who, action, resource, "not_deployed")
        raise
    _audit(request, who, action, resource, "started", {"flow_run_id": started.id})
    return started


@router.post("/sources/{source}/sync")
def sync_now(request: Request, source: str, who: Who, form: Form) -> Response:
    require(who, ADMIN)
    started = _start_sync(request, who, source, "console.sync", f"source:{source}")
    return _see_other("/console/sources", run=started.id)


# -- quarantine ------------------------------------------------------------------------------


@router.get("/quarantine")
def quarantine_page(request: Request, who: Who, source: str = "", stage: str = "",
                    run: str = "") -> Response:
    from headwater.config import load_sources

    require(who, VIEW_SOURCES)
    settings, store = _settings(request), _store(request)
    admin = ADMIN in permissions(who)
    entries, hidden = rows.visible_quarantine(store, who.principals, admin, source, stage)
    started, trouble = _prefect_or_nothing(
        lambda: runs.flow_run(settings, run) if run else None, None)
    return _render(request, "quarantine.html", title="Quarantine", entries=entries,
                   hidden=hidden, source=source, stage=stage, started=started, trouble=trouble,
                   sources=sorted(load_sources(settings.config)),
                   stages=rows.quarantine_stages(store), may_retry=admin)


@router.post("/quarantine/retry")
def retry(request: Request, who: Who, form: Form) -> Response:
    require(who, ADMIN)
    source, doc_id = form.get("source"), form.get("doc_id")
    if not any(e.doc_id == doc_id for e in _store(request).quarantined(source)):
        raise HeadwaterError(f"{doc_id!r} of {source!r} is not in quarantine (a sync may have "
                             "indexed it meanwhile)")
    started = _start_sync(request, who, source, "console.retry", f"{source}:{doc_id}")
    return _see_other("/console/quarantine", run=started.id)


# -- privacy requests and the audit trail ------------------------------------------------------


def _export_file(settings: Settings, run: runs.RunState) -> Path | None:
    """A console request's export, only where the console itself asked for it to be."""
    output = run.parameters.get("output")
    if runs.CONSOLE_TAG not in run.tags or not output:
        return None
    path = Path(str(output)).resolve()
    folder = (settings.data_dir / "privacy" / "console").resolve()
    return path if path.is_relative_to(folder) and path.is_file() else None


@router.get("/privacy")
def privacy_page(request: Request, who: Who, run: str = "") -> Response:
    require(who, PRIVACY)
    settings = _settings(request)
    found, trouble = _prefect_or_nothing(lambda: runs.privacy_runs(settings), [])
    deployment, _ = _prefect_or_nothing(lambda: runs.privacy_deployment(settings), None)
    starts = [r.start_time for r in found if r.start_time]
    closings = []
    if starts:
        oldest = rows.naive_utc(min(starts))
        for kind in {str(r.parameters.get("kind")) for r in found}:
            closings += _store(request).audit_since(f"privacy.{kind}", oldest)
    requests = rows.privacy_rows(found, closings,
                                 {r.id: _export_file(settings, r) is not None for r in found})
    return _render(request, "privacy.html", title="Privacy requests", requests=requests,
                   trouble=trouble, deployment=deployment, started=run, kinds=REQUEST_KINDS)


@router.post("/privacy")
def file_request(request: Request, who: Who, form: Form) -> Response:
    from tasks.privacy import CLI_KINDS

    require(who, PRIVACY)
    kind, scope = form.get("kind"), form.get("scope", "chunks") or "chunks"
    if kind not in REQUEST_KINDS or scope not in ("chunks", "document"):
        raise HeadwaterError("choose an access or an erasure request, of chunks or documents")
    identifiers = {CLI_KINDS[field]: form.all(field) for field in ("email", "phone", "name")
                   if form.all(field)}
    if not identifiers:
        raise HeadwaterError("name the person by at least one e-mail address, phone number "
                             "or name")
    started = runs.start_privacy_request(_settings(request), kind, identifiers,
                                         _actor(who), scope)
    # Which kinds of identifier, never their values: the audit trail goes to a SIEM.
    _audit(request, who, "console.privacy_request", f"flow-run:{started.id}", "started",
           {"kind": kind, "scope": scope, "entity_types": sorted(identifiers)})
    return _see_other("/console/privacy", run=started.id)


@router.get("/privacy/{run_id}/export")
def download_export(request: Request, run_id: str, who: Who) -> Response:
    require(who, PRIVACY)
    run = runs.flow_run(_settings(request), run_id)
    path = _export_file(_settings(request), run) if run and run.final else None
    if run is None or path is None or run.state_type != "COMPLETED":
        _audit(request, who, "console.export_download", f"flow-run:{run_id}", "not_found")
        return _render(request, "refused.html", 404, title="No export",
                       message="This request has no export (yet): only a completed access "
                       "request started here has one.")
    _audit(request, who, "console.export_download", f"flow-run:{run_id}", "ok")
    return FileResponse(path, media_type="application/json",
                        filename=f"{run.parameters.get('kind')}-{run_id}{path.suffix}")


def _audit_page(request: Request, before: int | None, verdict: Any = None) -> Response:
    entries = _store(request).latest_audit(AUDIT_PAGE, before)
    older = entries[-1].id if len(entries) == AUDIT_PAGE else None
    return _render(request, "audit.html", title="Audit trail", entries=entries, older=older,
                   verdict=verdict, before=before)


@router.get("/audit")
def audit_page(request: Request, who: Who, before: int | None = None) -> Response:
    require(who, PRIVACY)
    return _audit_page(request, before)


@router.post("/audit/verify")
def verify_audit(request: Request, who: Who, form: Form) -> Response:
    """What `headwater audit verify` does, recorded the same way."""
    require(who, PRIVACY)
    verdict = _store(request).verify_audit()
    _audit(request, who, "audit.verify", "audit_log", "intact" if verdict.intact else "broken",
           {"checked": verdict.checked, "broken_id": verdict.broken_id})
    return _audit_page(request, None, verdict)


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        return Response(status_code=404)
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"cache-control": "max-age=300"})
