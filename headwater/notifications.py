"""Change notifications over HTTP: Headwater's own, SharePoint, Confluence and S3 webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from headwater.config import ConfigError, SourceConfig, load_sources
from headwater.errors import HeadwaterError
from headwater.settings import Settings
from headwater.state import StateStore
from tasks.changes import ChangeNotice, accept_changes

# Headwater's own notifications and Confluence's carry "sha256=<hex HMAC-SHA256 of the body>".
SIGNATURE_HEADER = "x-headwater-signature"
CONFLUENCE_SIGNATURE_HEADER = "x-hub-signature"
# S3 notifications come through SNS or a relay that cannot sign a body without the network
# (SNS signatures are checked against a downloaded certificate): they carry the secret itself.
S3_SECRET_HEADER = "x-headwater-secret"
# Confluence events that name one piece of content, and where in the payload it is.
CONFLUENCE_CONTENT = ("page", "blog", "blogpost", "attachment", "comment", "content")
MAX_VALIDATION_TOKEN = 1024

router = APIRouter(tags=["change notifications"])


class NotificationRefused(HeadwaterError):
    """A notification that is not taken: unknown source, no secret, bad signature or payload."""

    def __init__(self, status: int, code: str, user_message: str,
                 log_message: str | None = None) -> None:
        super().__init__(user_message, log_message)
        self.status, self.code = status, code


class HeadwaterNotification(BaseModel):
    """Headwater's own notification: documents of the source that changed, by id (a folder's
    relative path, an S3 key, a Confluence `SPACE/id`), or that its list changed."""

    doc_ids: list[str] = Field(default_factory=list, max_length=10_000)
    list_changed: bool = False


def sign(secret: str, body: bytes, source: str | None = None) -> str:
    """"sha256=<hex HMAC-SHA256>" of a body. Headwater's own notifications sign the source's
    name and a newline before the body, so that a signature is never valid for another
    source, even one sharing the secret (Confluence signs the body alone)."""
    signed = body if source is None else source.encode() + b"\n" + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison; a missing signature never matches."""
    return given is not None and hmac.compare_digest(expected.encode(), given.strip().encode())


def parse_headwater(source: str, body: bytes) -> ChangeNotice:
    try:
        notification = HeadwaterNotification.model_validate_json(body)
    except ValidationError as error:
        raise _invalid("the body is not a Headwater change notification", str(error)) from error
    if not (notification.doc_ids or notification.list_changed):
        raise _invalid("a notification names `doc_ids` or sets `list_changed`")
    return ChangeNotice(source, tuple(notification.doc_ids), notification.list_changed)


def parse_sharepoint(source: str, body: bytes, client_state: str) -> ChangeNotice:
    """A SharePoint webhook names subscriptions, never items: the library's change log tells
    which items changed. Every entry must carry the subscription's clientState."""
    entries = _json(body).get("value")
    if not isinstance(entries, list) or not entries:
        raise _invalid("a SharePoint notification has a non-empty `value` list")
    for entry in entries:
        given = entry.get("clientState") if isinstance(entry, dict) else None
        if not signature_matches(client_state, given if isinstance(given, str) else None):
            raise NotificationRefused(401, "unauthorized",
                                      "the notification's clientState does not match the "
                                      "source's secret")
    return ChangeNotice(source, list_changed=True)


def parse_confluence(source: str, body: bytes) -> ChangeNotice:
    """A Confluence webhook (`page_updated`, `page_trashed`, `attachment_created`, ...) names
    one piece of content; its document id is `SPACE/id`, as the connector makes it."""
    payload = _json(body)
    ids = []
    for kind in CONFLUENCE_CONTENT:
        content = payload.get(kind)
        if not isinstance(content, dict) or "id" not in content:
            continue
        space = content.get("spaceKey") or _object(content.get("space")).get("key")
        if not space:
            raise _invalid(f"the Confluence event's {kind} names no space")
        ids.append(f"{space}/{content['id']}")
    if not ids:
        raise _invalid("the Confluence event names no page, blog post or attachment")
    return ChangeNotice(source, tuple(ids))


def parse_s3(source: str, body: bytes, bucket: str) -> ChangeNotice:
    """S3 event notifications (directly, or in an SNS envelope): keys created or removed in
    the source's bucket. Keys arrive URL-encoded. A test event names nothing."""
    payload = _json(body)
    if payload.get("Type") == "SubscriptionConfirmation":
        raise _invalid("confirm the SNS subscription by visiting its SubscribeURL; Headwater "
                       "does not fetch URLs a notification names")
    if payload.get("Type") == "Notification":
        payload = _json(str(payload.get("Message", "")).encode())
    if payload.get("Event") == "s3:TestEvent":
        return ChangeNotice(source)
    records = payload.get("Records")
    if not isinstance(records, list):
        raise _invalid("an S3 event notification has a `Records` list")
    keys = []
    for record in map(_object, records):
        s3 = _object(record.get("s3"))
        key = _object(s3.get("object")).get("key")
        if not str(record.get("eventName", "")).startswith(("ObjectCreated:", "ObjectRemoved:")):
            continue
        if _object(s3.get("bucket")).get("name") == bucket and isinstance(key, str):
            keys.append(unquote_plus(key))
    return ChangeNotice(source, tuple(keys))


def _json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _invalid("the body is not JSON", str(error)) from error
    if not isinstance(payload, dict):
        raise _invalid("the body is not a JSON object")
    return payload


def _object(value: Any) -> dict[str, Any]:
    """A JSON object of a payload, or an empty one where the sender put something else."""
    return value if isinstance(value, dict) else {}


def _invalid(message: str, detail: str | None = None) -> NotificationRefused:
    return NotificationRefused(422, "invalid_request", message, detail)


def _source(settings: Settings, name: str, kind: str | None = None) -> tuple[SourceConfig, str]:
    """The source a notification is for and its notification secret, or the refusal."""
    sources = load_sources(settings.config)
    if name not in sources:
        raise NotificationRefused(404, "not_found", f"no source named {name!r}")
    config = sources[name]
    if kind is not None and config.type != kind:
        raise NotificationRefused(422, "invalid_request",
                                  f"source {name!r} is a {config.type} source, not {kind}")
    if config.notifications.secret is None:
        raise NotificationRefused(403, "forbidden",
                                  f"source {name!r} accepts no change notifications: give it "
                                  "`notifications: {secret: {env: VAR}}` in headwater.yaml")
    try:
        secret = config.notifications.secret.resolve().get_secret_value()
    except ConfigError as error:
        raise NotificationRefused(500, "internal_error",
                                  f"source {name!r}'s notification secret cannot be read",
                                  error.user_message) from error
    return config, secret


def _record(settings: Settings, notice: ChangeNotice) -> dict[str, Any]:
    recorded = accept_changes(StateStore(settings.resolved_state_db_url), notice)
    return {"source": notice.source, "recorded": recorded, "list_changed": notice.list_changed}


def _refused(request: Request, refused: NotificationRefused) -> JSONResponse:
    from headwater.api import _error  # the API's one error shape; imported late (api imports us)

    return _error(refused.status, refused.code, refused.user_message,
                  request.state.request_id)


async def _take(request: Request, source: str, parse: Any, kind: str | None = None) -> Response:
    """Check the sender, parse, record: a refused notification records nothing."""
    settings: Settings = request.app.state.settings
    body = await request.body()
    try:
        config, secret = _source(settings, source, kind)
        notice = parse(config, secret, body, request.headers)
        result = await run_in_threadpool(_record, settings, notice)
    except NotificationRefused as refused:
        return _refused(request, refused)
    return JSONResponse(status_code=202, content=result)


def _check_signature(secret: str, body: bytes, header: str | None,
                     source: str | None = None) -> None:
    if not signature_matches(sign(secret, body, source), header):
        raise NotificationRefused(401, "unauthorized", "the notification's signature is "
                                  "missing or does not match the source's secret")


@router.post("/v1/sources/{source}/changes", status_code=202,
             responses={401: {}, 403: {}, 404: {}, 413: {}, 422: {}})
async def headwater_changes(source: str, request: Request) -> Response:
    """Headwater's own notification, signed `x-headwater-signature: sha256=<hex>` (HMAC-SHA256
    with the source's secret of the source name, a newline, and the raw body)."""

    def parse(config: SourceConfig, secret: str, body: bytes, headers: Any) -> ChangeNotice:
        _check_signature(secret, body, headers.get(SIGNATURE_HEADER), config.name)
        return parse_headwater(config.name, body)

    return await _take(request, source, parse)


@router.post("/v1/sources/{source}/changes/sharepoint", status_code=202,
             responses={401: {}, 403: {}, 404: {}, 413: {}, 422: {}})
async def sharepoint_changes(source: str, request: Request) -> Response:
    """A SharePoint webhook: the subscription handshake (`validationtoken`, echoed as plain
    text), then notifications whose clientState is the source's secret."""
    token = request.query_params.get("validationtoken")
    if token is not None:
        try:
            _source(request.app.state.settings, source, "sharepoint")
        except NotificationRefused as refused:
            return _refused(request, refused)
        if len(token) > MAX_VALIDATION_TOKEN:
            return _refused(request, _invalid("the validation token is too long"))
        return PlainTextResponse(token)

    def parse(config: SourceConfig, secret: str, body: bytes, headers: Any) -> ChangeNotice:
        return parse_sharepoint(config.name, body, secret)

    return await _take(request, source, parse, "sharepoint")


@router.post("/v1/sources/{source}/changes/confluence", status_code=202,
             responses={401: {}, 403: {}, 404: {}, 413: {}, 422: {}})
async def confluence_changes(source: str, request: Request) -> Response:
    """A Confluence webhook, signed `x-hub-signature: sha256=<hex HMAC-SHA256 of the body>`
    with the webhook's secret, which is the source's."""

    def parse(config: SourceConfig, secret: str, body: bytes, headers: Any) -> ChangeNotice:
        _check_signature(secret, body, headers.get(CONFLUENCE_SIGNATURE_HEADER))
        return parse_confluence(config.name, body)

    return await _take(request, source, parse, "confluence")


@router.post("/v1/sources/{source}/changes/s3", status_code=202,
             responses={401: {}, 403: {}, 404: {}, 413: {}, 422: {}})
async def s3_changes(source: str, request: Request) -> Response:
    """S3 event notifications, carrying the source's secret in `x-headwater-secret`."""

    def parse(config: SourceConfig, secret: str, body: bytes, headers: Any) -> ChangeNotice:
        if not signature_matches(secret, headers.get(S3_SECRET_HEADER)):
            raise NotificationRefused(401, "unauthorized", "the notification's secret is "
                                      "missing or does not match the source's")
        return parse_s3(config.name, body, str(config.params.get("bucket", "")))

    return await _take(request, source, parse, "s3")
