"""A wire-level Confluence (REST v1, Cloud or Data Center) that atlassian-python-api talks to."""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from tests.emulators import Emulator, Request, Response

# The CQL this emulator understands: clauses joined by `and`, then an optional `order by`.
_CLAUSE = re.compile(r'^\s*(\w+)\s*(>=|<=|!=|=|>|<|\bin\b|\bnot in\b)\s*(.+?)\s*$', re.IGNORECASE)
_ORDER = re.compile(r"\s+order\s+by\s+(\w+)(?:\s+(asc|desc))?\s*$", re.IGNORECASE)


class CqlError(ValueError):
    """A query outside the supported subset: answered 400, as Confluence answers bad CQL."""


@dataclass
class Content:
    """A page, blog post or attachment as Confluence stores it."""

    id: str
    type: str
    space: str
    title: str
    body: str = ""
    status: str = "current"
    version: int = 1
    when: datetime = field(default_factory=lambda: datetime.now(UTC))
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    parent: str | None = None  # a page's parent page; an attachment's page
    read_groups: list[str] = field(default_factory=list)
    read_users: list[str] = field(default_factory=list)
    data: bytes = b""
    media_type: str = "application/octet-stream"


@dataclass
class Space:
    key: str
    id: int
    readers: list[str]  # "group:<name>", "user:<name>" or "public"


class ConfluenceEmulator(Emulator):
    """Spaces, pages, blog posts, attachments, restrictions and space permissions in memory.

    `deployment="cloud"` serves under /wiki with basic auth (e-mail and API token) and names
    users by e-mail; `"datacenter"` serves at the root with a bearer personal access token and
    names users by username.
    """

    def __init__(self, deployment: str = "cloud", user: str = "robot@contoso.com",
                 secret: str = "s3cret-token") -> None:
        super().__init__()
        self.deployment, self.user, self.secret = deployment, user, secret
        self.prefix = "/wiki" if deployment == "cloud" else ""
        self.spaces: dict[str, Space] = {}
        self.content: dict[str, Content] = {}
        self.search_faults: list[list[int]] = []  # [page number, status, times left]
        self._next_id = 65536
        self._data_lock = threading.Lock()

    # -- what tests call ---------------------------------------------------------------------

    def add_space(self, key: str, readers: list[str]) -> None:
        self.spaces[key] = Space(key, len(self.spaces) + 1, list(readers))

    def add_page(self, space: str, title: str, body_storage: str,
                 restricted_to_groups: list[str] | tuple[str, ...] = (),
                 restricted_to_users: list[str] | tuple[str, ...] = (),
                 parent: str | None = None, kind: str = "page") -> str:
        """A new page (or `kind="blogpost"`); returns its id."""
        with self._data_lock:
            content_id = self._new_id()
            self.content[content_id] = Content(
                content_id, kind, space, title, body_storage, parent=parent,
                read_groups=list(restricted_to_groups), read_users=list(restricted_to_users))
        return content_id

    def add_blog_post(self, space: str, title: str, body_storage: str) -> str:
        return self.add_page(space, title, body_storage, kind="blogpost")

    def add_attachment(self, page: str, filename: str, data: bytes,
                       media_type: str = "application/octet-stream") -> str:
        with self._data_lock:
            content_id = f"att{self._new_id()}"
            self.content[content_id] = Content(
                content_id, "attachment", self.content[page].space, filename, parent=page,
                data=data, media_type=media_type)
        return content_id

    def edit_page(self, content_id: str, body_storage: str | None = None,
                  title: str | None = None) -> None:
        """An edit: a new version number and a new last-modified time."""
        with self._data_lock:
            page = self.content[content_id]
            page.body = page.body if body_storage is None else body_storage
            page.title = page.title if title is None else title
            page.version += 1
            page.when = datetime.now(UTC)

    def trash_page(self, content_id: str) -> None:
        self._set_status(content_id, "trashed")

    def archive_page(self, content_id: str) -> None:
        self._set_status(content_id, "archived")

    def restrict_page(self, content_id: str, groups: list[str] | tuple[str, ...] = (),
                      users: list[str] | tuple[str, ...] = ()) -> None:
        """Replace a page's read restriction; as in Confluence, the version does not move."""
        with self._data_lock:
            page = self.content[content_id]
            page.read_groups, page.read_users = list(groups), list(users)

    def inject_search_fault(self, page: int, status: int, times: int = 1) -> None:
        """Fail the CQL search's `page`-th page (1-based, by its `start`) `times` times."""
        self.search_faults.append([page, status, times])

    # -- bookkeeping -----------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def _set_status(self, content_id: str, status: str) -> None:
        with self._data_lock:
            moment = datetime.now(UTC)
            gone = self.content[content_id]
            for item in self.content.values():
                # As in Confluence, the children of a removed page move up to its parent.
                if item.parent == content_id and item.type != "attachment":
                    item.parent = gone.parent
                # A page's attachments go with it.
                if item.id == content_id or (item.parent == content_id and (
                        item.type == "attachment")):
                    item.status, item.when = status, moment

    def _ancestors(self, item: Content) -> list[Content]:
        chain: list[Content] = []
        parent = item.parent
        while parent is not None:
            chain.insert(0, self.content[parent])
            parent = self.content[parent].parent
        return chain

    # -- HTTP ------------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        if self.deployment == "cloud":
            expected = base64.b64encode(f"{self.user}:{self.secret}".encode()).decode()
            return header == f"Basic {expected}"
        return header == f"Bearer {self.secret}"

    def handle(self, request: Request) -> Response:
        if not request.path.startswith(self.prefix + "/"):
            return _error(404, f"no such path {request.path}")
        if not self._authorized(request):
            return _error(401, "Client must be authenticated to access this resource.")
        path = request.path[len(self.prefix):]
        routes = [
            (r"/rest/api/user/current", self._current_user),
            (r"/rest/api/user", self._user),
            (r"/rest/api/space/([^/]+)/permissions", self._space_permissions),
            (r"/rest/api/space/([^/]+)", self._space),
            (r"/rest/api/content/search", self._search),
            (r"/rest/api/content/([^/]+)/restriction/byOperation", self._restrictions),
            (r"/rest/api/content/([^/]+)", self._content_by_id),
            (r"/download/attachments/([^/]+)/(.+)", self._download),
        ]
        if request.method != "GET":
            return _error(405, f"{request.method} is not emulated")
        for pattern, answer in routes:
            match = re.fullmatch(pattern, path)
            if match:
                with self._data_lock:
                    return answer(request, *match.groups())
        return _error(404, f"no such resource {path}")

    # -- users and spaces ------------------------------------------------------------------------

    def _user_json(self, name: str) -> dict[str, Any]:
        key = hashlib.sha1(name.encode()).hexdigest()[:24]
        if self.deployment == "cloud":
            return {"type": "known", "accountId": f"5b10:{key}", "accountType": "atlassian",
                    "email": name, "publicName": name.split("@")[0], "displayName": name}
        return {"type": "known", "username": name, "userKey": key, "displayName": name}

    def _current_user(self, request: Request) -> Response:
        return Response(200, self._user_json(self.user))

    def _user(self, request: Request) -> Response:
        wanted = request.arg("key")
        names = {self.user} | {r.removeprefix("user:") for s in self.spaces.values()
                               for r in s.readers if r.startswith("user:")}
        for name in names:
            if self._user_json(name).get("userKey") == wanted:
                return Response(200, self._user_json(name))
        return _error(404, f"No user found with key {wanted}")

    def _space_json(self, space: Space, expand: set[str]) -> dict[str, Any]:
        found: dict[str, Any] = {
            "id": space.id, "key": space.key, "name": f"{space.key} space", "type": "global",
            "status": "current",
            "_links": {"webui": f"/spaces/{space.key}", "self": self._api(f"space/{space.key}")},
            "_expandable": {"homepage": "", "description": "", "permissions": ""},
        }
        if "permissions" in expand:
            found["_expandable"].pop("permissions")
            found["permissions"] = [self._cloud_permission(r) for r in space.readers]
        return found

    def _cloud_permission(self, reader: str) -> dict[str, Any]:
        """One read-space grant as Cloud's `space?expand=permissions` shows it."""
        operation = {"operation": "read", "targetType": "space"}
        if reader == "public":
            return {"operation": operation, "anonymousAccess": True, "unlicensedAccess": False}
        kind, name = reader.split(":", 1)
        subject = (self._user_json(name) if kind == "user"
                   else {"type": "group", "name": name, "id": f"g-{name}"})
        return {"operation": operation, "anonymousAccess": False, "unlicensedAccess": False,
                "subjects": {kind: {"results": [subject], "size": 1}}}

    def _space(self, request: Request, key: str) -> Response:
        if key not in self.spaces:
            return _error(404, f"No space found with key : {key}")
        return Response(200, self._space_json(self.spaces[key], _expand(request)))

    def _space_permissions(self, request: Request, key: str) -> Response:
        """Data Center's space permissions: one entry per grant, users by user key."""
        if key not in self.spaces:
            return _error(404, f"No space found with key : {key}")
        granted = []
        for reader in self.spaces[key].readers:
            if reader == "public":
                subject: dict[str, Any] = {"type": "anonymous"}
            elif reader.startswith("user:"):
                subject = {"type": "user",
                           "userKey": self._user_json(reader[5:]).get("userKey", "")}
            else:
                subject = {"type": "group", "name": reader.removeprefix("group:")}
            granted.append({"operation": {"targetType": "space", "operationKey": "read"},
                            "subject": subject, "spaceKey": key,
                            "spaceId": self.spaces[key].id})
        return Response(200, granted)

    # -- content ---------------------------------------------------------------------------------

    def _api(self, resource: str) -> str:
        return f"{self.url}{self.prefix}/rest/api/{resource}"

    def _content_json(self, item: Content, expand: set[str]) -> dict[str, Any]:
        space = self.spaces[item.space]
        webui = (f"/spaces/{item.space}/pages/{item.id}/{quote(item.title)}"
                 if item.type != "attachment" else
                 f"/pages/viewpageattachments.action?pageId={item.parent}")
        found: dict[str, Any] = {
            "id": item.id, "type": item.type, "status": item.status, "title": item.title,
            "_links": {"webui": webui, "self": self._api(f"content/{item.id}"),
                       "tinyui": f"/x/{item.id}"},
            "_expandable": {},
        }
        parts: dict[str, Any] = {
            "space": lambda: self._space_json(space, set()),
            "version": lambda: {"by": self._user_json(self.user),
                                "when": item.when.isoformat(timespec="milliseconds")
                                .replace("+00:00", "Z"),
                                "number": item.version, "minorEdit": False, "message": ""},
            "ancestors": lambda: [{"id": a.id, "type": a.type, "status": a.status,
                                   "title": a.title} for a in self._ancestors(item)
                                  if item.type != "attachment"],
            "container": lambda: (self._content_json(self.content[item.parent], set())
                                  if item.type == "attachment" and item.parent
                                  else self._space_json(space, set())),
            "history": lambda: {"latest": True, "createdBy": self._user_json(self.user),
                                "createdDate": item.created.isoformat()},
        }
        for name, build in parts.items():
            if name in expand:
                found[name] = build()
            else:
                found["_expandable"][name] = ""
        if "body.storage" in expand and item.type != "attachment":
            found["body"] = {"storage": {"value": item.body, "representation": "storage",
                                         "_expandable": {"content": ""}}}
        if item.type == "attachment":
            found["extensions"] = {"mediaType": item.media_type, "fileSize": len(item.data),
                                   "comment": ""}
            found["_links"]["download"] = (
                f"/download/attachments/{item.parent}/{quote(item.title)}"
                f"?version={item.version}&modificationDate="
                f"{int(item.when.timestamp() * 1000)}&api=v2")
        return found

    def _content_by_id(self, request: Request, content_id: str) -> Response:
        item = self.content.get(content_id)
        wanted = (request.arg("status") or "current").split(",")
        if item is None or not ("any" in wanted or item.status in wanted):
            return _error(404, "No content found with id : ContentId{id=" + content_id + "}")
        return Response(200, self._content_json(item, _expand(request)))

    def _restrictions(self, request: Request, content_id: str) -> Response:
        item = self.content.get(content_id)
        if item is None:
            return _error(404, f"No content found with id {content_id}")

        def operation(name: str, users: list[str], groups: list[str]) -> dict[str, Any]:
            return {
                "operation": name,
                "restrictions": {
                    "user": {"results": [self._user_json(u) for u in users], "start": 0,
                             "limit": 200, "size": len(users)},
                    "group": {"results": [{"type": "group", "name": g, "id": f"g-{g}"}
                                          for g in groups],
                              "start": 0, "limit": 200, "size": len(groups)},
                },
                "_expandable": {"content": f"/rest/api/content/{content_id}"},
                "_links": {"self": self._api(f"content/{content_id}/restriction/byOperation/"
                                             f"{name}")},
            }

        return Response(200, {"read": operation("read", item.read_users, item.read_groups),
                              "update": operation("update", [], [])})

    def _download(self, request: Request, page: str, filename: str) -> Response:
        for item in self.content.values():
            if (item.type == "attachment" and item.parent == page and item.status == "current"
                    and quote(item.title) == quote(filename)):
                return Response(200, item.data, content_type=item.media_type)
        return _error(404, f"No attachment {filename} on page {page}")

    # -- CQL search ------------------------------------------------------------------------------

    def _search(self, request: Request) -> Response:
        start = int(request.arg("start") or 0)
        limit = min(int(request.arg("limit") or 25), 200)
        for fault in self.search_faults:
            if fault[2] > 0 and start == (fault[0] - 1) * limit:
                fault[2] -= 1
                return _error(fault[1], "injected search fault")
        try:
            found = self._query(request.arg("cql") or "")
        except CqlError as error:
            return _error(400, f"Could not parse cql : {error}")
        page = found[start:start + limit]
        expand = _expand(request)
        links: dict[str, str] = {"base": f"{self.url}{self.prefix}", "context": self.prefix,
                                 "self": self._api("content/search")}
        if start + limit < len(found):
            query = {"cql": request.arg("cql"), "limit": limit, "start": start + limit}
            if request.arg("expand"):
                query["expand"] = request.arg("expand")
            links["next"] = f"/rest/api/content/search?{urlencode(query)}"
        return Response(200, {"results": [self._content_json(c, expand) for c in page],
                              "start": start, "limit": limit, "size": len(page),
                              "_links": links})

    def _query(self, cql: str) -> list[Content]:
        order = _ORDER.search(cql)
        where = cql[:order.start()] if order else cql
        tests = [self._clause(c) for c in re.split(r"\s+and\s+", where.strip(),
                                                   flags=re.IGNORECASE) if c]
        if not any(getattr(t, "field", "") == "status" for t in tests):
            tests.append(_Test("status", "=", ["current"]))
        found = [c for c in self.content.values() if all(t.passes(c) for t in tests)]
        if order:
            key = order.group(1).lower()
            if key not in ("lastmodified", "created", "title"):
                raise CqlError(f"cannot order by {key}")
            attribute = {"lastmodified": "when", "created": "created", "title": "title"}[key]
            found.sort(key=lambda c: (getattr(c, attribute), int(c.id.removeprefix("att"))),
                       reverse=(order.group(2) or "asc").lower() == "desc")
        return found

    def _clause(self, text: str) -> _Test:
        match = _CLAUSE.match(text)
        if not match:
            raise CqlError(f"unsupported clause {text!r}")
        name, operator, raw = match.group(1).lower(), match.group(2).lower(), match.group(3)
        if name not in ("space", "type", "status", "lastmodified", "created"):
            raise CqlError(f"unsupported field {name}")
        if operator in ("in", "not in"):
            if not (raw.startswith("(") and raw.endswith(")")):
                raise CqlError(f"{operator} needs a list: {raw}")
            values = [v.strip().strip('"') for v in raw[1:-1].split(",")]
        else:
            values = [raw.strip('"')]
        return _Test(name, operator, values)


@dataclass
class _Test:
    field: str
    operator: str
    values: list[str]

    def passes(self, item: Content) -> bool:
        if self.field in ("lastmodified", "created"):
            # CQL dates have minute granularity: "yyyy-MM-dd HH:mm", in UTC here.
            moment = datetime.strptime(self.values[0], "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
            actual = item.when if self.field == "lastmodified" else item.created
            return {">=": actual >= moment, ">": actual > moment, "<=": actual <= moment,
                    "<": actual < moment, "=": actual == moment}[self.operator]
        actual_value = {"space": item.space, "type": item.type, "status": item.status}[
            self.field]
        if self.operator in ("=", "in"):
            return actual_value in self.values
        if self.operator in ("!=", "not in"):
            return actual_value not in self.values
        raise CqlError(f"{self.field} cannot be compared with {self.operator}")


def _expand(request: Request) -> set[str]:
    return {e.strip() for e in (request.arg("expand") or "").split(",") if e.strip()}


def _error(status: int, message: str) -> Response:
    reasons = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
               405: "Method Not Allowed"}
    return Response(status, {"statusCode": status, "data": {"authorized": status != 401,
                                                            "valid": status < 400,
                                                            "errors": [], "successful": False},
                             "message": message, "reason": reasons.get(status, "Error")})
