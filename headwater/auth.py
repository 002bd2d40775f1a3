"""Bearer tokens (HS256 or RS256 from a JWKS file) to callers, and roles to permissions."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jwt

from headwater.errors import HeadwaterError
from headwater.records import Caller
from headwater.settings import Settings

QUERY = "rag:query"
VIEW_SOURCES = "rag:view_sources"
TUNE = "rag:tune"
ADMIN = "rag:admin"
# Data-subject requests and the audit trail: compliance officers' work.
PRIVACY = "rag:privacy"

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({QUERY, VIEW_SOURCES, TUNE, ADMIN, PRIVACY}),
    "compliance_officer": frozenset({QUERY, VIEW_SOURCES, PRIVACY}),
    "power_user": frozenset({QUERY, VIEW_SOURCES, TUNE}),
    "user": frozenset({QUERY, VIEW_SOURCES}),
    "readonly": frozenset({VIEW_SOURCES}),
}


class AuthError(HeadwaterError):
    """The request carries no valid identity (HTTP 401)."""

    code = "unauthorized"


class Forbidden(HeadwaterError):
    """The caller is known but lacks a permission (HTTP 403)."""

    code = "forbidden"


def permissions(caller: Caller) -> frozenset[str]:
    granted: set[str] = set()
    for role in caller.roles:
        granted |= ROLE_PERMISSIONS.get(role, frozenset())
    return frozenset(granted)


def require(caller: Caller, permission: str) -> None:
    if permission not in permissions(caller):
        raise Forbidden(f"this needs the permission {permission}",
                        f"{caller.user_id} with roles {caller.roles} lacks {permission}")


@lru_cache(maxsize=4)
def _jwks(path: Path) -> jwt.PyJWKSet:
    return jwt.PyJWKSet.from_dict(json.loads(path.read_text()))


def _key_for(settings: Settings, token: str) -> tuple[object, list[str]]:
    header = jwt.get_unverified_header(token)
    algorithm = header.get("alg")
    if algorithm == "HS256" and settings.jwt_secret:
        return settings.jwt_secret.get_secret_value(), ["HS256"]
    if algorithm == "RS256" and settings.jwt_jwks_file:
        keys = _jwks(settings.jwt_jwks_file)
        kid = header.get("kid")
        matching = [k for k in keys.keys if kid is None or k.key_id == kid]
        if not matching:
            raise AuthError("token signed by an unknown key", f"kid {kid!r} not in the JWKS")
        return matching[0].key, ["RS256"]
    raise AuthError("token algorithm not accepted", f"alg {algorithm!r} is not configured")


def caller_from_token(settings: Settings, authorization: str | None) -> Caller:
    """The caller a bearer token names; no token is an anonymous caller where allowed."""
    if not authorization:
        if settings.api_allow_anonymous:
            return Caller(roles=["user"])  # public documents only: it has no principals
        raise AuthError("a bearer token is required")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("the Authorization header must be 'Bearer <token>'")
    try:
        key, algorithms = _key_for(settings, token)
        claims = jwt.decode(
            token, key, algorithms=algorithms, audience=settings.jwt_audience,
            issuer=settings.jwt_issuer, options={"require": ["exp", "sub", "aud"]},
        )
    except jwt.ExpiredSignatureError as error:
        raise AuthError("the token has expired") from error
    except jwt.InvalidAudienceError as error:
        raise AuthError("the token is not meant for this service") from error
    except jwt.PyJWTError as error:
        raise AuthError("the token is not valid", f"{type(error).__name__}: {error}") from error
    groups, roles = claims.get("groups", []), claims.get("roles", [])
    if not isinstance(groups, list) or not isinstance(roles, list):
        raise AuthError("the token's groups and roles must be lists")
    return Caller(user_id=str(claims["sub"]), groups=[str(g) for g in groups],
                  roles=[str(r) for r in roles])
