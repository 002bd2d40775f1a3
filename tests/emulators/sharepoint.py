"""A SharePoint Online site and its Entra ID token endpoint, as the client library uses them."""

from __future__ import annotations

import base64
import re
import secrets
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from tests.emulators import Emulator, Request, Response

# .NET ticks (100 ns since 0001-01-01) are the time part of a change token.
_TICKS_AT_EPOCH = 621355968000000000

# Role definitions as SharePoint Online publishes them; Limited Access lacks ViewListItems (0x1).
ROLES = {
    "Full Control": {"Id": 1073741829, "RoleTypeKind": 5, "High": "2147483647",
                     "Low": "4294967295"},
    "Edit": {"Id": 1073741830, "RoleTypeKind": 6, "High": "432", "Low": "1011030767"},
    "Contribute": {"Id": 1073741827, "RoleTypeKind": 3, "High": "432", "Low": "1011028719"},
    "Read": {"Id": 1073741826, "RoleTypeKind": 2, "High": "176", "Low": "138612833"},
    "Limited Access": {"Id": 1073741825, "RoleTypeKind": 1, "High": "48", "Low": "134287360"},
}


def _sp_error(status: int, code: str, message: str) -> Response:
    """An error in the shape SharePoint's REST API (OData verbose) answers with."""
    return Response(status, {"error": {"code": code,
                                       "message": {"lang": "en-US", "value": message}}})


def _odata_date(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Item:
    """A list item: a file, a folder or a site page."""

    id: int
    unique_id: str
    url: str  # server-relative, e.g. /sites/handbook/Shared Documents/hr/pay.md
    folder: bool
    content: bytes = b""
    version: int = 1
    modified: datetime = field(default_factory=lambda: datetime.now(UTC))
    readers: list[str] | None = None  # None: inherits from its parent
    canvas: str | None = None  # a site page's canvas content (HTML)
    title: str = ""


@dataclass
class Library:
    id: str
    title: str
    root: str  # server-relative url of the root folder
    template: int  # 101 a document library, 119 the Site Pages library
    items: dict[int, Item] = field(default_factory=dict)
    readers: list[str] | None = None


class SharePointEmulator(Emulator):
    """One site collection of one tenant: libraries, folders, files, pages, permissions and the
    change log, plus the OAuth2 client-credentials endpoint of the tenant's authority.

    Readers are principal strings as Headwater writes them: "group:<SharePoint group title>",
    "aad:<security group display name>" (an Entra ID group granted directly) or
    "user:<email>". Paths given to the methods are relative to a library's root.
    """

    def __init__(self, tenant: str = "contoso.onmicrosoft.com", client_id: str | None = None,
                 client_secret: str = "right-secret", site: str = "/sites/handbook",
                 site_readers: tuple[str, ...] = ("group:staff",)) -> None:
        super().__init__()
        self.tenant = tenant
        self.client_id = client_id or str(uuid.uuid4())
        self.client_secret = client_secret
        self.certificates: dict[str, Any] = {}  # x5t -> public key of an uploaded certificate
        self.tokens: set[str] = set()
        self.forbidden_sites: set[str] = set()
        self.site = site
        self.web_id = str(uuid.uuid4())
        self.site_id = str(uuid.uuid4())
        self.site_readers = list(site_readers)
        self.libraries: dict[str, Library] = {}
        self.changes: list[dict[str, Any]] = []
        self.change_number = 0
        self.change_log_start = 0  # tokens older than this number have expired
        self.failing_pages: dict[int, int] = {}  # items page number -> failures left
        self._model = threading.RLock()
        self._principal_ids: dict[str, int] = {}
        self.add_library("Documents", "Shared Documents")
        self.add_library("Site Pages", "SitePages", template=119)

    # -- the tenant: credentials --------------------------------------------------------------

    def add_certificate(self, certificate_pem: bytes) -> str:
        """Upload a certificate to the app registration; returns its SHA-1 thumbprint (hex)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        cert = x509.load_pem_x509_certificate(certificate_pem)
        thumbprint = cert.fingerprint(hashes.SHA1())  # Entra ID's x5t is SHA-1
        self.certificates[_b64url(thumbprint)] = cert.public_key()
        return thumbprint.hex().upper()

    def issue_token(self) -> str:
        """A bearer token as if issued earlier (a pre-issued token given to the app)."""
        token = secrets.token_urlsafe(24)
        self.tokens.add(token)
        return token

    # -- the site: what tests change --------------------------------------------------------

    def add_library(self, title: str, folder: str | None = None, template: int = 101) -> Library:
        with self._model:
            library = Library(str(uuid.uuid4()), title, f"{self.site}/{folder or title}",
                              template)
            self.libraries[title] = library
            return library

    def add_file(self, library: str, path: str, body: bytes,
                 readers: list[str] | None = None) -> Item:
        with self._model:
            lib = self.libraries[library]
            parent = lib.root
            for part in path.split("/")[:-1]:
                parent = f"{parent}/{part}"
                if self._by_url(parent) is None:
                    self._new_item(lib, parent, folder=True)
            item = self._new_item(lib, f"{lib.root}/{path}", folder=False, content=body)
            if readers is not None:
                self.set_readers(path, readers, library)
            return item

    def add_page(self, name: str, html: str, title: str | None = None,
                 readers: list[str] | None = None) -> Item:
        with self._model:
            lib = next(x for x in self.libraries.values() if x.template == 119)
            item = self._new_item(lib, f"{lib.root}/{name}.aspx", folder=False,
                                  content=b"<%@ Page %>", canvas=html, title=title or name)
            if readers is not None:
                self.set_readers(f"{name}.aspx", readers, lib.title)
            return item

    def edit_file(self, path: str, body: bytes, library: str | None = None) -> None:
        with self._model:
            lib, item = self._find(path, library)
            item.content, item.version = body, item.version + 1
            item.modified = datetime.now(UTC)
            self._log(lib, item, 2)

    def edit_page(self, name: str, html: str) -> None:
        with self._model:
            lib, item = self._find(f"{name}.aspx", "Site Pages")
            item.canvas, item.version = html, item.version + 1
            item.modified = datetime.now(UTC)
            self._log(lib, item, 2)

    def delete_file(self, path: str, library: str | None = None) -> None:
        with self._model:
            lib, item = self._find(path, library)
            del lib.items[item.id]
            self._log(lib, item, 3)

    def move_file(self, path: str, new_path: str, library: str | None = None) -> None:
        """Move (or rename) within a library: SharePoint keeps the item and its unique id."""
        with self._model:
            lib, item = self._find(path, library)
            parent = lib.root
            for part in new_path.split("/")[:-1]:
                parent = f"{parent}/{part}"
                if self._by_url(parent) is None:
                    self._new_item(lib, parent, folder=True)
            item.url = f"{lib.root}/{new_path}"
            item.version += 1
            item.modified = datetime.now(UTC)
            self._log(lib, item, 4)

    def set_readers(self, path: str, readers: list[str] | None,
                    library: str | None = None) -> None:
        """Break inheritance on a file or folder and grant Read to `readers` only (None
        restores inheritance). Nothing about the content or its version changes."""
        with self._model:
            lib, item = self._find(path, library)
            item.readers = None if readers is None else list(readers)
            self._log(lib, item, 11 if readers is not None else 12)

    def set_site_readers(self, readers: list[str]) -> None:
        """Grant Read on the site to `readers` only: every library and item that inherits
        follows. Logged in the site's change log, not in any list's."""
        with self._model:
            added = set(readers) - set(self.site_readers)
            self.site_readers = list(readers)
            self._log_scope(None, 11 if added else 12)

    def set_library_readers(self, library: str, readers: list[str] | None) -> None:
        """Break inheritance on a library and grant Read to `readers` (None inherits again)."""
        with self._model:
            lib = self.libraries[library]
            lib.readers = None if readers is None else list(readers)
            self._log_scope(lib, 11 if readers is not None else 12)

    def expire_change_log(self) -> None:
        """Every change token issued so far is now older than the change log."""
        with self._model:
            self.change_log_start = self.change_number + 1

    def fail_items_page(self, page: int, status: int = 500, times: int = 100) -> None:
        """Answer the `page`-th page (1-based) of any item listing with `status`."""
        self.failing_pages[page] = times

    # -- the model ---------------------------------------------------------------------------

    def _new_item(self, lib: Library, url: str, folder: bool, content: bytes = b"",
                  canvas: str | None = None, title: str = "") -> Item:
        ids = [i for x in self.libraries.values() for i in x.items]
        item = Item(max(ids, default=0) + 1, str(uuid.uuid4()), url, folder, content,
                    canvas=canvas, title=title)
        lib.items[item.id] = item
        self._log(lib, item, 1)
        return item

    def _log(self, lib: Library, item: Item, change_type: int) -> None:
        self.change_number += 1
        self.changes.append({"list": lib.id, "number": self.change_number,
                             "type": change_type, "item": item.id, "unique": item.unique_id,
                             "url": item.url, "folder": item.folder,
                             "time": datetime.now(UTC)})

    def _log_scope(self, lib: Library | None, change_type: int) -> None:
        """A change of the site (lib None) or of a list itself, not of one of its items."""
        self.change_number += 1
        self.changes.append({"list": lib.id if lib else None, "number": self.change_number,
                             "type": change_type, "item": None, "time": datetime.now(UTC)})

    def _token(self, lib: Library, number: int, when: datetime | None = None) -> str:
        when = when or datetime.now(UTC)
        ticks = _TICKS_AT_EPOCH + int(when.timestamp() * 10_000_000)
        return f"1;3;{lib.id};{ticks};{number}"

    def _by_url(self, url: str) -> tuple[Library, Item] | None:
        for lib in self.libraries.values():
            for item in lib.items.values():
                if item.url.lower() == url.lower():
                    return lib, item
        return None

    def _find(self, path: str, library: str | None) -> tuple[Library, Item]:
        libraries = [self.libraries[library]] if library else list(self.libraries.values())
        for lib in libraries:
            found = self._by_url(f"{lib.root}/{path}")
            if found:
                return found
        raise KeyError(f"no file {path!r} in {[lib.title for lib in libraries]}")

    def _principal(self, reader: str) -> dict[str, Any]:
        kind, _, name = reader.partition(":")
        number = self._principal_ids.setdefault(reader, len(self._principal_ids) + 7)
        if kind == "user":
            return {"__metadata": {"type": "SP.User"}, "Id": number, "Title": name.split("@")[0],
                    "Email": name, "LoginName": f"i:0#.f|membership|{name}",
                    "PrincipalType": 1, "IsSiteAdmin": False}
        if kind == "aad":
            object_id = uuid.uuid5(uuid.NAMESPACE_URL, name)
            return {"__metadata": {"type": "SP.User"}, "Id": number, "Title": name, "Email": "",
                    "LoginName": f"c:0t.c|tenant|{object_id}", "PrincipalType": 4}
        return {"__metadata": {"type": "SP.Group"}, "Id": number, "Title": name,
                "LoginName": name, "PrincipalType": 8, "OwnerTitle": "Handbook Owners"}

    def _assignments(self, readers: list[str], extra: dict[str, str]) -> list[dict[str, Any]]:
        grants = {r: "Read" for r in readers}
        grants.update({r: role for r, role in extra.items() if r not in grants})
        return [{"__metadata": {"type": "SP.RoleAssignment"},
                 "PrincipalId": self._principal(reader)["Id"],
                 "Member": self._principal(reader),
                 "RoleDefinitionBindings": {"results": [{
                     "__metadata": {"type": "SP.RoleDefinition"}, "Name": role,
                     "Id": ROLES[role]["Id"], "RoleTypeKind": ROLES[role]["RoleTypeKind"],
                     "Hidden": role == "Limited Access",
                     "BasePermissions": {"__metadata": {"type": "SP.BasePermissions"},
                                         "High": ROLES[role]["High"],
                                         "Low": ROLES[role]["Low"]}}]}}
                for reader, role in grants.items()]

    # -- HTTP --------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        path = unquote(request.path)
        token_path = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path)
        if token_path:
            return self._issue(request, token_path.group(1))
        if "/_api/" not in path.lower():
            return Response(404, "404 NOT FOUND", content_type="text/plain")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") not in self.tokens:
            return Response(401, {"error_description": "Invalid JWT token. No certificate "
                                  "thumbprint specified in token header."},
                            {"WWW-Authenticate": 'Bearer realm="' + self.tenant + '",'
                             'client_id="00000003-0000-0ff1-ce00-000000000000"'})
        site, _, api = path.partition("/_api/")
        if site.lower() != self.site.lower():
            return Response(404, "404 FILE NOT FOUND", content_type="text/plain")
        if site.lower() in self.forbidden_sites:
            return _sp_error(403, "-2147024891, System.UnauthorizedAccessException",
                             "Access denied. You do not have permission to perform this action "
                             "or access this resource.")
        with self._model:
            return self._api(request, api)

    def _issue(self, request: Request, tenant: str) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        trace = str(uuid.uuid4())

        def refuse(status: int, error: str, code: int, text: str) -> Response:
            return Response(status, {
                "error": error, "error_description": f"AADSTS{code}: {text}\r\nTrace ID: "
                f"{trace}\r\nCorrelation ID: {uuid.uuid4()}\r\nTimestamp: "
                f"{datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}", "error_codes": [code],
                "timestamp": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%SZ}", "trace_id": trace,
                "correlation_id": str(uuid.uuid4()),
                "error_uri": f"https://login.microsoftonline.com/error?code={code}"})

        if tenant != self.tenant:
            return refuse(400, "invalid_request", 90002,
                          f"Tenant '{tenant}' not found. Check to make sure you have the "
                          "correct tenant ID and are signing into the correct cloud.")
        if form.get("grant_type") != "client_credentials":
            return refuse(400, "unsupported_grant_type", 70003,
                          "The app requested an unsupported grant type.")
        if form.get("client_id") != self.client_id:
            return refuse(400, "unauthorized_client", 700016,
                          f"Application with identifier '{form.get('client_id')}' was not "
                          f"found in the directory '{tenant}'.")
        if "client_assertion" in form:
            problem = self._check_assertion(form.get("client_assertion", ""),
                                            request.path)
            if problem:
                return refuse(401, "invalid_client", 700027, problem)
        elif form.get("client_secret") != self.client_secret:
            return refuse(401, "invalid_client", 7000215,
                          "Invalid client secret provided. Ensure the secret being sent in "
                          "the request is the client secret value, not the client secret ID, "
                          f"for a secret added to app '{self.client_id}'.")
        if not form.get("scope", "").endswith("/.default"):
            return refuse(400, "invalid_scope", 1002012,
                          "The provided value for scope is not valid. Client credential flows "
                          "must have a scope value with /.default suffixed to the resource "
                          "identifier (application ID URI).")
        return Response(200, {"token_type": "Bearer", "expires_in": 3599,
                              "ext_expires_in": 3599, "access_token": self.issue_token()})

    def _check_assertion(self, assertion: str, token_path: str) -> str | None:
        import jwt

        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError as error:
            return f"Client assertion is not a valid JWT: {error}"
        key = self.certificates.get(str(header.get("x5t", "")))
        if key is None:
            return (f"The certificate with identifier used to sign the client assertion is not "
                    f"registered on application. [Reason - The key was not found., Thumbprint "
                    f"of key used by client: '{header.get('x5t')}']")
        try:
            claims = jwt.decode(assertion, key, algorithms=["RS256", "PS256"],
                                audience=f"{self.url}{token_path}",
                                options={"require": ["exp", "aud", "iss", "sub", "jti"]})
        except jwt.PyJWTError as error:
            return f"Client assertion failed signature validation: {error}"
        if claims["iss"] != self.client_id or claims["sub"] != self.client_id:
            return "The client assertion's issuer and subject must be the client id."
        return None

    def _api(self, request: Request, api: str) -> Response:
        lower = api.lower()
        base = f"{self.url}{self.site}/_api"
        if lower == "contextinfo" and request.method == "POST":
            return Response(200, {"d": {"GetContextWebInformation": {
                "__metadata": {"type": "SP.ContextWebInformation"},
                "FormDigestTimeoutSeconds": 1800,
                "FormDigestValue": f"0x{secrets.token_hex(32).upper()},"
                                   f"{datetime.now(UTC):%d %b %Y %H:%M:%S} -0000",
                "LibraryVersion": "16.0.25019.12005", "SiteFullUrl": f"{self.url}{self.site}",
                "WebFullUrl": f"{self.url}{self.site}"}}})
        if lower == "web":
            return Response(200, {"d": self._web_json(base)})
        if lower == "web/roleassignments":
            return Response(200, {"d": {"results": self._assignments(
                self.site_readers, {"user:guest@fabrikam.com": "Limited Access"})}})
        if lower == "web/getchanges" and request.method == "POST":
            return self._web_changes(request)
        if lower == "web/lists":
            return Response(200, {"d": {"results": [self._list_json(base, lib)
                                                    for lib in self.libraries.values()]}})
        folder = re.fullmatch(r"web/getfolderbyserverrelativeurl\('(.*)'\)/listitemallfields",
                              api, re.IGNORECASE)
        if folder:
            found = self._by_url(folder.group(1).replace("''", "'"))
            if found is None:
                return _sp_error(404, "-2147024894, System.IO.FileNotFoundException",
                                 "File Not Found.")
            return Response(200, {"d": self._item_json(base, *found)})
        file = re.fullmatch(r"web/getfilebyserverrelativeurl\('(.*)'\)/\$value", api,
                            re.IGNORECASE)
        if file:
            found = self._by_url(file.group(1).replace("''", "'"))
            if found is None or found[1].folder:
                return _sp_error(404, "-2147024894, System.IO.FileNotFoundException",
                                 "File Not Found.")
            return Response(200, found[1].content, content_type="application/octet-stream")
        lists = re.fullmatch(r"web/lists/(?:getbytitle\('(.*?)'\)|getbyid\('(.*?)'\))(/.*)?",
                             api, re.IGNORECASE)
        if lists:
            title, list_id, rest = lists.groups()
            lib = next((x for x in self.libraries.values()
                        if (title and x.title.lower() == title.replace("''", "'").lower())
                        or (list_id and x.id == list_id.lower())), None)
            if lib is None:
                return _sp_error(404, "-1, System.ArgumentException",
                                 f"List '{title or list_id}' does not exist at site with URL "
                                 f"'{self.url}{self.site}'.")
            return self._list_api(request, base, lib, (rest or "").lower())
        return _sp_error(400, "-1, Microsoft.SharePoint.Client.InvalidClientQueryException",
                         f"The emulator does not implement {request.method} /_api/{api}")

    def _list_api(self, request: Request, base: str, lib: Library, rest: str) -> Response:
        if rest == "":
            return Response(200, {"d": self._list_json(base, lib)})
        if rest == "/roleassignments":
            readers = lib.readers if lib.readers is not None else self.site_readers
            return Response(200, {"d": {"results": self._assignments(readers, {})}})
        if rest == "/items":
            return self._items_page(request, base, lib)
        one = re.fullmatch(r"/(?:items/getbyid|getitembyid)\((\d+)\)(/roleassignments)?", rest)
        if one:
            item = lib.items.get(int(one.group(1)))
            if item is None:
                return _sp_error(404, "-2147024809, System.ArgumentException",
                                 "Item does not exist. It may have been deleted by another "
                                 "user.")
            if one.group(2):
                if item.readers is None:  # an inheriting item answers with its parent's
                    return _sp_error(400, "-1, System.InvalidOperationException",
                                     "This operation is not allowed on an object that "
                                     "inherits permissions.")
                return Response(200, {"d": {"results": self._assignments(
                    item.readers, {})}})
            return Response(200, {"d": self._item_json(base, lib, item)})
        if rest == "/getchanges" and request.method == "POST":
            return self._changes(request, lib)
        return _sp_error(400, "-1, Microsoft.SharePoint.Client.InvalidClientQueryException",
                         f"The emulator does not implement {request.method} list{rest}")

    def _items_page(self, request: Request, base: str, lib: Library) -> Response:
        top = int(request.arg("$top") or 100)
        after = 0
        skiptoken = request.arg("$skiptoken")
        if skiptoken:
            after = int(parse_qs(skiptoken).get("p_ID", ["0"])[0])
        page = 1 + sum(1 for i in lib.items if i <= after) // max(top, 1) if after else 1
        if self.failing_pages.get(page, 0) > 0:
            self.failing_pages[page] -= 1
            return _sp_error(500, "-2146232832, Microsoft.SharePoint.SPException",
                             "Something went wrong. (injected)")
        items = sorted((i for i in lib.items.values() if i.id > after), key=lambda i: i.id)
        since = re.search(r"Modified ge datetime'([^']+)'", request.arg("$filter") or "")
        if since:
            cutoff = datetime.fromisoformat(since.group(1).replace("Z", "+00:00"))
            items = [i for i in items if i.modified >= cutoff]
        selected, more = items[:top], len(items) > top
        body: dict[str, Any] = {"results": [self._item_json(base, lib, i) for i in selected]}
        if more:
            keep = {k: v[0] for k, v in request.query.items() if k != "$skiptoken"}
            query = "&".join(f"{quote(k)}={quote(v)}" for k, v in keep.items())
            token = quote(f"Paged=TRUE&p_ID={selected[-1].id}", safe="")
            body["__next"] = (f"{base}/Web/lists/GetById('{lib.id}')/items?%24skiptoken="
                              f"{token}&{query}")
        return Response(200, {"d": body})

    def _changes_after(self, query: dict[str, Any], scope_id: str, scope: str
                       ) -> int | Response:
        """The change number a query's start token names (0 without one), or the error
        SharePoint answers for a token of another scope or older than the change log."""
        start = (query.get("ChangeTokenStart") or {}).get("StringValue")
        if not start:
            return 0
        parts = start.split(";")
        if len(parts) != 5 or parts[2] != scope_id:
            return _sp_error(400, "-1, System.ArgumentException",
                             f"The change token is not valid for this {scope}.")
        if int(parts[4]) < self.change_log_start:
            return _sp_error(400, "-2146233086, System.ArgumentOutOfRangeException",
                             "Specified argument was out of the range of valid values.\r\n"
                             "Parameter name: The changeToken refers to a time before the "
                             "start of the current change log.")
        return int(parts[4])

    def _changes(self, request: Request, lib: Library) -> Response:
        query = (request.json() or {}).get("query", {})
        after = self._changes_after(query, lib.id, "list")
        if isinstance(after, Response):
            return after
        limit = int(query.get("FetchLimit") or 1000)
        found = [c for c in self.changes if c["list"] == lib.id and c["item"] is not None
                 and c["number"] > after]
        wanted = {1: "Add", 2: "Update", 3: "DeleteObject", 4: "Rename", 7: "Restore",
                  11: "RoleAssignmentAdd", 12: "RoleAssignmentDelete"}
        found = [c for c in found if query.get(wanted.get(c["type"], "Update"))
                 or (c["type"] in (11, 12) and query.get("SecurityPolicy"))][:limit]
        return Response(200, {"d": {"results": [{
            "__metadata": {"type": "SP.ChangeItem"},
            "ChangeToken": {"__metadata": {"type": "SP.ChangeToken"},
                            "StringValue": self._token(lib, c["number"], c["time"])},
            "ChangeType": c["type"], "SiteId": self.site_id, "Time": _odata_date(c["time"]),
            "ItemId": c["item"], "ListId": lib.id, "WebId": self.web_id,
            "UniqueId": c["unique"], "ServerRelativeUrl": c["url"],
            "FileSystemObjectType": 1 if c["folder"] else 0, "Hidden": False,
        } for c in found]}})

    def _web_changes(self, request: Request) -> Response:
        """The site's change log: changes of the site itself (SP.ChangeWeb) and of its lists
        (SP.ChangeList), by the query's object and change types."""
        query = (request.json() or {}).get("query", {})
        after = self._changes_after(query, self.web_id, "site")
        if isinstance(after, Response):
            return after
        wanted = {11: "RoleAssignmentAdd", 12: "RoleAssignmentDelete"}
        found = [c for c in self.changes if c["item"] is None and c["number"] > after
                 and query.get("List" if c["list"] else "Web")
                 and query.get(wanted.get(c["type"], "Update"))]
        found = found[:int(query.get("FetchLimit") or 1000)]
        ticks = lambda c: _TICKS_AT_EPOCH + int(c["time"].timestamp() * 10_000_000)  # noqa: E731
        return Response(200, {"d": {"results": [{
            "__metadata": {"type": "SP.ChangeList" if c["list"] else "SP.ChangeWeb"},
            "ChangeToken": {"__metadata": {"type": "SP.ChangeToken"},
                            "StringValue": f"1;2;{self.web_id};{ticks(c)};{c['number']}"},
            "ChangeType": c["type"], "SiteId": self.site_id, "Time": _odata_date(c["time"]),
            "WebId": self.web_id, **({"ListId": c["list"]} if c["list"] else {}),
        } for c in found]}})

    def _web_json(self, base: str) -> dict[str, Any]:
        return {"__metadata": {"id": f"{base}/Web", "uri": f"{base}/Web", "type": "SP.Web"},
                "Id": self.web_id, "Title": "Handbook", "Url": f"{self.url}{self.site}",
                "ServerRelativeUrl": self.site, "HasUniqueRoleAssignments": True,
                "CurrentChangeToken": {"__metadata": {"type": "SP.ChangeToken"},
                                       "StringValue": f"1;2;{self.web_id};0;"
                                                      f"{self.change_number}"}}

    def _list_json(self, base: str, lib: Library) -> dict[str, Any]:
        uri = f"{base}/Web/Lists(guid'{lib.id}')"
        return {"__metadata": {"id": uri, "uri": uri, "etag": '"1"', "type": "SP.List"},
                "Id": lib.id, "Title": lib.title, "BaseTemplate": lib.template, "BaseType": 1,
                "Hidden": False, "ItemCount": len(lib.items),
                "HasUniqueRoleAssignments": lib.readers is not None,
                "EntityTypeName": lib.root.rsplit("/", 1)[-1].replace(" ", "_x0020_"),
                "CurrentChangeToken": {"__metadata": {"type": "SP.ChangeToken"},
                                       "StringValue": self._token(lib, self.change_number)},
                "RootFolder": {"__metadata": {"type": "SP.Folder"},
                               "ServerRelativeUrl": lib.root, "Name": lib.root.split("/")[-1]}}

    def _item_json(self, base: str, lib: Library, item: Item) -> dict[str, Any]:
        uri = f"{base}/Web/Lists(guid'{lib.id}')/Items({item.id})"
        directory, _, leaf = item.url.rpartition("/")
        fields: dict[str, Any] = {
            "__metadata": {"id": uri, "uri": uri, "etag": f'"{item.version}"',
                           "type": f"SP.Data.{lib.title.replace(' ', '_x0020_')}Item"},
            "Id": item.id, "ID": item.id, "UniqueId": item.unique_id, "GUID": item.unique_id,
            "FileSystemObjectType": 1 if item.folder else 0, "FSObjType": "1" if item.folder
            else "0", "FileRef": item.url, "FileLeafRef": leaf, "FileDirRef": directory,
            "Title": item.title or None, "Modified": _odata_date(item.modified),
            "Created": _odata_date(item.modified - timedelta(days=1)),
            "OData__UIVersionString": f"{item.version}.0",
            "File_x0020_Size": None if item.folder else str(len(item.content)),
            "HasUniqueRoleAssignments": item.readers is not None,
        }
        if item.canvas is not None:
            fields["CanvasContent1"] = item.canvas
        return fields
