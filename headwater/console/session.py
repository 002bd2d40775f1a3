"""Console sign-in: the API's bearer token kept in a cookie, CSRF tokens, and the dev login."""

from __future__ import annotations

import ipaddress
import secrets
import time

import jwt
from fastapi import Request, Response

from headwater.auth import AuthError, Forbidden, caller_from_token
from headwater.errors import HeadwaterError
from headwater.records import Caller
from headwater.settings import Settings

SESSION_COOKIE = "headwater_console"
CSRF_COOKIE = "headwater_console_csrf"
CSRF_FIELD = "csrf_token"
COOKIE_PATH = "/console"
# Dev-login tokens are short-lived: a forgotten browser tab does not stay signed in for long.
DEV_TOKEN_S = 1800


class SignInRequired(AuthError):
    """The console has no valid session for this browser (redirected to sign-in)."""


class CsrfRefused(Forbidden):
    """A state-changing form came without the browser's CSRF token."""


def caller_of(settings: Settings, request: Request) -> Caller:
    """The signed-in caller, from the session cookie's bearer token."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        raise SignInRequired("please sign in")
    try:
        return caller_from_token(settings, f"Bearer {token}")
    except AuthError as error:
        raise SignInRequired(f"please sign in again: {error.user_message}",
                             error.log_message) from error


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def start_session(settings: Settings, request: Request, response: Response,
                  token: str) -> Caller:
    """Validate a bearer token and keep it in the session cookie until it expires."""
    token = token.strip().removeprefix("Bearer ").strip()
    caller = caller_from_token(settings, f"Bearer {token}")
    # Verified just above; read again only for its expiry.
    expires = int(jwt.decode(token, options={"verify_signature": False})["exp"])
    response.set_cookie(SESSION_COOKIE, token, max_age=max(1, expires - int(time.time())),
                        path=COOKIE_PATH, httponly=True, samesite="strict",
                        secure=_secure(request))
    return caller


def end_session(request: Request, response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict",
                           secure=_secure(request))


def csrf_token(request: Request) -> str:
    """The browser's CSRF token (double-submit: a cookie, and a hidden field in each form),
    made on its first page; `keep_csrf` sets the cookie on the response."""
    token = request.cookies.get(CSRF_COOKIE) or getattr(request.state, "new_csrf", None)
    if not token:
        token = request.state.new_csrf = secrets.token_urlsafe(32)
    return token


def keep_csrf(request: Request, response: Response) -> None:
    if getattr(request.state, "new_csrf", None):
        response.set_cookie(CSRF_COOKIE, request.state.new_csrf, path=COOKIE_PATH,
                            httponly=True, samesite="strict", secure=_secure(request))


def check_csrf(request: Request, given: str) -> None:
    """A cross-site page can post a form, but cannot read this cookie to copy it in."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), given.encode()):
        raise CsrfRefused("this form has expired or did not come from the console; reload "
                          "the page and try again", "CSRF token missing or not matching")


def is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # not an address (a test client's name, a unix socket)
        return False


def dev_login_offered(settings: Settings, request: Request) -> bool:
    return bool(settings.console_dev_login and settings.jwt_secret and is_loopback(request))


def dev_token(settings: Settings, request: Request, user_id: str, groups: list[str],
              roles: list[str]) -> str:
    """A short-lived HS256 token for whoever the developer names; refused unless the dev
    login is enabled, a secret is configured and the browser is on this machine."""
    if not dev_login_offered(settings, request):
        raise Forbidden("the dev login is only offered on loopback, when enabled",
                        f"dev login refused: enabled={settings.console_dev_login}, secret="
                        f"{settings.jwt_secret is not None}, client="
                        f"{request.client.host if request.client else None}")
    if not user_id.strip():
        raise HeadwaterError("a user id is needed")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id.strip(), "groups": groups, "roles": roles,
                                 "aud": settings.jwt_audience, "iat": now,
                                 "exp": now + DEV_TOKEN_S}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")
