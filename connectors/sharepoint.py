"""A SharePoint Online site: document libraries and site pages, kept in step by change tokens."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from office365.runtime.client_request_exception import ClientRequestException
from office365.sharepoint.changes.query import ChangeQuery
from office365.sharepoint.changes.token import ChangeToken
from office365.sharepoint.client_context import ClientContext

from connectors.base import (
    Backoff,
    Change,
    ChangeKind,
    ChangePage,
    ConnectionCheck,
    Cursor,
    Retry,
    retry_after_seconds,
)
from headwater.config import ConfigError, SourceConfig
from headwater.errors import HeadwaterError, SourceError, TransientError
from headwater.records import SourceDocument
from headwater.state import KnownDocument
from tasks.parse import DocumentRejected, mime_for

T = TypeVar("T")

AUTHORITY = "https://login.microsoftonline.com"
DOCUMENT_LIBRARY, SITE_PAGES = 101, 119
ITEM_FIELDS = ["Id", "UniqueId", "FileRef", "FileLeafRef", "FileDirRef", "FSObjType",
               "Modified", "Title", "OData__UIVersionString", "File_x0020_Size",
               "HasUniqueRoleAssignments"]
KEY_FIELDS = ["Id", "UniqueId", "FileRef", "FileDirRef", "FSObjType",
              "HasUniqueRoleAssignments"]
# ViewListItems: the one base permission without which nobody reads an item; "Limited Access"
# (granted on parents of shared items so the sharing works) lacks it.
VIEW_LIST_ITEMS = 0x1
READ_ROLE_KINDS = {2, 3, 4, 5, 6}  # Reader, Contributor, WebDesigner, Administrator, Editor
PRINCIPAL_USER, PRINCIPAL_SECURITY_GROUP, PRINCIPAL_SHAREPOINT_GROUP = 1, 4, 8

# What a change-log entry means for the index (SP.ChangeType): read the item again, drop it,
# or recompute who may read it (and, for a folder, everything under it).
REREAD, GONE, READERS = "reread", "gone", "readers"
CHANGE_TYPES = {1: REREAD, 2: REREAD, 4: REREAD, 5: REREAD, 6: REREAD, 7: REREAD, 15: REREAD,
                3: GONE, 8: READERS, 9: READERS, 10: READERS, 11: READERS, 12: READERS,
                13: READERS, 14: READERS}
# Readers granted above the items (on the site, or on a library itself) change in the site's
# change log, never in a list's: its token is kept beside the libraries' under this key.
SITE_TOKEN = "site"
# Site- and list-scope entries that can change who inherits Read: role definitions (8-10) and
# role assignments (11, 12).
REGRANTING = {8, 9, 10, 11, 12}
# Statuses worth another try; anything else is explained to a person.
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
# The SharePoint answer to a change token older than the change log.
EXPIRED_TOKEN = "changeToken refers to a time before the start of the current change log"
# SharePoint stamps Modified from its own clock; widen the fallback window past clock skew.
CLOCK_SKEW = timedelta(minutes=5)
_TICKS_AT_EPOCH = 621355968000000000


class ChangeLogExpired(Exception):
    """The stored change token is older than what the site's change log still holds."""


@dataclass(frozen=True)
class LibraryRef:
    id: str
    title: str
    root: str  # server-relative url of the root folder
    pages: bool


@dataclass(frozen=True)
class Entry:
    """Where an item listed in this run lives, so `fetch` needs no second lookup."""

    library: LibraryRef
    item_id: int
    url: str
    title: str
    size: int
    modified: datetime | None


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _ticks_to_datetime(token: str) -> datetime:
    ticks = int(token.split(";")[3])
    return datetime.fromtimestamp((ticks - _TICKS_AT_EPOCH) / 10_000_000, UTC)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _token_value(token: Any) -> str:
    """A change token's string, however the library handed it over."""
    if isinstance(token, dict):
        return str(token.get("StringValue") or "")
    return str(getattr(token, "StringValue", None) or token or "")


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class SharePointConnector:
    """One site: its document libraries (all, or those named) and optionally its site pages.

    Doc ids are the items' unique ids, which SharePoint keeps when a file is renamed or moved
    within its library: a move is then a MODIFIED change of the same document (new url, maybe
    new readers) instead of a deletion and an addition, and the change log's entries, which
    name items by id, map to doc ids without a lookup table.
    """

    def __init__(self, config: SourceConfig, backoff: Backoff | None = None) -> None:
        self.name = config.name
        self.config = config
        params = config.params
        if "site_url" not in params:
            raise ConfigError(f"source {config.name!r}: params.site_url is required")
        self.site_url: str = str(params["site_url"]).rstrip("/")
        split = urlsplit(self.site_url)
        self.host = f"{split.scheme}://{split.netloc}"
        self.site_path = split.path
        self.library_titles: list[str] | None = params.get("libraries")
        self.include_pages: bool = bool(params.get("include_pages", False))
        self.authority: str = str(params.get("authority", AUTHORITY)).rstrip("/")
        self.page_size = config.batch_size
        self.backoff = backoff or Backoff(**config.throttling.model_dump())
        self.timeout_s = float(params.get("timeout_s", 60))
        self.context = ClientContext(self.site_url).with_access_token(self._acquire_token)
        self.context.with_transport(timeout=(10, self.timeout_s))
        self._entries: dict[str, Entry] = {}
        self._acl_cache: dict[str, tuple[str, ...]] = {}

    # -- credentials ---------------------------------------------------------------------------

    def _acquire_token(self) -> dict[str, Any]:
        """An app-only token: pre-issued, or from the tenant's authority by client secret or
        certificate (a signed client assertion). msal and the library's own helpers insist on
        an https authority known to Microsoft, so the OAuth2 client-credentials POST is made
        here, to whatever authority is configured."""
        params = self.config.params
        if "token" in params:
            return {"access_token": self.config.secret("token").get_secret_value(),
                    "token_type": "Bearer"}
        tenant, client_id = params.get("tenant"), params.get("client_id")
        if not tenant or not client_id:
            raise ConfigError(f"source {self.name!r}: SharePoint needs params.token, or "
                              "params.tenant and params.client_id with a client_secret or a "
                              "certificate")
        endpoint = f"{self.authority}/{tenant}/oauth2/v2.0/token"
        form = {"grant_type": "client_credentials", "client_id": client_id,
                "scope": f"{self.host}/.default"}
        if "client_secret" in params:
            # Entra ID issues it, but SharePoint Online's REST API accepts app-only tokens only
            # from a certificate login ("Unsupported app only token"); kept for the emulator,
            # SharePoint Server and tenants that front SharePoint with their own authority.
            form["client_secret"] = self.config.secret("client_secret").get_secret_value()
        elif "private_key" in params:
            form["client_assertion_type"] = (
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            form["client_assertion"] = self._client_assertion(endpoint, client_id)
        else:
            raise ConfigError(f"source {self.name!r}: SharePoint needs params.client_secret or "
                              "params.private_key (with certificate_path or "
                              "certificate_thumbprint)")

        def post() -> requests.Response:
            response = requests.post(endpoint, data=form, timeout=(10, self.timeout_s))
            if response.status_code in TRANSIENT_STATUSES:
                response.raise_for_status()
            return response

        try:
            response = self.backoff.run(post, self._classify, "Entra ID")
        except requests.RequestException as error:
            raise self._explain(error) from error
        body = response.json() if response.content else {}
        if response.status_code != 200 or "access_token" not in body:
            reason = str(body.get("error_description", response.text)).split("\r\n")[0]
            raise SourceError(f"source {self.name!r}: SharePoint refused the app's credentials "
                              f"({reason.split('. ')[0]})", reason)
        return body

    def _client_assertion(self, audience: str, client_id: str) -> str:
        import jwt

        params = self.config.params
        thumbprint = params.get("certificate_thumbprint")
        if thumbprint:
            digest = bytes.fromhex(str(thumbprint).replace(":", ""))
        elif "certificate_path" in params:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes

            path = self.config.base_dir / str(params["certificate_path"])
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
            digest = certificate.fingerprint(hashes.SHA1())  # x5t is SHA-1 by definition
        else:
            raise ConfigError(f"source {self.name!r}: a certificate login needs "
                              "params.certificate_path or params.certificate_thumbprint")
        now = int(time.time())
        return jwt.encode(
            {"aud": audience, "iss": client_id, "sub": client_id, "jti": str(uuid.uuid4()),
             "nbf": now, "iat": now, "exp": now + 600},
            self.config.secret("private_key").get_secret_value(), algorithm="RS256",
            headers={"x5t": _b64url(digest)})

    # -- errors ------------------------------------------------------------------------------

    def _classify(self, error: Exception) -> Retry | None:
        """Throttled or briefly unavailable: retry, after the server's Retry-After if given."""
        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return Retry()
        status = _status(error)
        if status in TRANSIENT_STATUSES:
            headers = getattr(getattr(error, "response", None), "headers", None) or {}
            return Retry(retry_after_seconds(headers.get("Retry-After")))
        return None

    def _describe(self, error: BaseException, library: str | None = None) -> tuple[str, bool]:
        """One line a person can act on, and whether retrying may cure it."""
        if isinstance(error, HeadwaterError):
            return error.user_message, isinstance(error, TransientError)
        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return f"SharePoint at {self.site_url} cannot be reached", True
        status = _status(error)
        if status == 401:
            return "SharePoint refused the app's credentials", False
        if status == 403:
            return f"the app may not read site {self.site_url}", False
        if status == 404:
            if library:
                return f"library {library!r} does not exist in site {self.site_url}", False
            return f"site {self.site_url} does not exist", False
        if status in TRANSIENT_STATUSES:
            return f"SharePoint is throttling or unavailable (HTTP {status})", True
        return f"SharePoint failed: {type(error).__name__} (HTTP {status})", False

    def _explain(self, error: BaseException, library: str | None = None) -> HeadwaterError:
        if isinstance(error, HeadwaterError):
            return error
        message, transient = self._describe(error, library)
        kind = TransientError if transient else SourceError
        return kind(f"source {self.name!r}: {message}", repr(error))

    def _call(self, operation: Callable[[], T], library: str | None = None) -> T:
        """One call to SharePoint, throttling waited out, any failure explained."""
        try:
            return self.backoff.run(operation, self._classify, "SharePoint")
        except (ClientRequestException, requests.RequestException) as error:
            raise self._explain(error, library) from error
        except TransientError as error:
            if error.user_message.startswith(f"source {self.name!r}"):
                raise
            raise TransientError(f"source {self.name!r}: {error.user_message}",
                                 error.log_message) from error

    # -- the site ----------------------------------------------------------------------------

    def test_connection(self) -> ConnectionCheck:
        try:
            web = self._call(lambda: self.context.web.get().select(["Title", "Url"])
                             .execute_query())
            libraries = self._libraries()
        except HeadwaterError as error:
            message = error.user_message.removeprefix(f"source {self.name!r}: ")
            return ConnectionCheck(False, message)
        names = ", ".join(lib.title for lib in libraries)
        return ConnectionCheck(True, f"site {web.properties.get('Title') or self.site_url} "
                                     f"is readable: {names}",
                               {lib.title: lib.id for lib in libraries})

    def _libraries(self) -> list[LibraryRef]:
        """The libraries this source reads, in a stable order."""
        found = self._call(lambda: self.context.web.lists.get()
                           .select(["Id", "Title", "BaseTemplate", "Hidden",
                                    "RootFolder/ServerRelativeUrl"])
                           .expand(["RootFolder"]).execute_query())
        by_title: dict[str, LibraryRef] = {}
        for lst in found:
            props = lst.properties
            template = props.get("BaseTemplate")
            if template not in (DOCUMENT_LIBRARY, SITE_PAGES) or props.get("Hidden"):
                continue
            root = (props.get("RootFolder") or {})
            root_url = root.get("ServerRelativeUrl") if isinstance(root, dict) else None
            by_title[props["Title"]] = LibraryRef(
                str(props["Id"]).lower(), props["Title"],
                root_url or lst.root_folder.properties.get("ServerRelativeUrl", ""),
                template == SITE_PAGES)
        wanted = self.library_titles or [t for t, lib in by_title.items() if not lib.pages]
        missing = [t for t in wanted if t not in by_title]
        if missing:
            raise SourceError(f"source {self.name!r}: library {missing[0]!r} does not exist "
                              f"in site {self.site_url}")
        chosen = [by_title[t] for t in wanted]
        if self.include_pages:
            chosen += [lib for lib in by_title.values() if lib.pages and lib not in chosen]
        return chosen

    def _site_token(self) -> dict[str, str]:
        web = self._call(lambda: self.context.web.get().select(["Id", "CurrentChangeToken"])
                         .execute_query())
        return {"token": _token_value(web.properties.get("CurrentChangeToken"))}

    def _current_tokens(self, libraries: Iterable[LibraryRef]) -> dict[str, dict[str, str]]:
        tokens = {}
        for lib in libraries:
            lst = self._call(lambda lib=lib: self.context.web.lists.get_by_id(lib.id).get()
                             .select(["Id", "CurrentChangeToken"]).execute_query(), lib.title)
            tokens[lib.id] = {"token": _token_value(lst.properties.get("CurrentChangeToken"))}
        return tokens

    # -- listing -----------------------------------------------------------------------------

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        """A full enumeration when there is no cursor (or one was interrupted), else the
        change log since the stored tokens; a library whose log expired falls back to
        `Modified` filtering, with deletions and readers reconciled by listing keys."""
        libraries = self._libraries()
        cursor = cursor or {}
        tokens: dict[str, dict[str, str]] = dict(cursor.get("libraries") or {})
        listing = cursor.get("listing")
        if not tokens or listing is not None:
            # The tokens are taken before the enumeration, so whatever changes while it runs is
            # in the log the next run reads; a resumed enumeration keeps the tokens it began with.
            tokens = tokens or {**self._current_tokens(libraries),
                                SITE_TOKEN: self._site_token()}
            yield from self._enumerate(libraries, tokens, known, listing)
            return
        added = [lib for lib in libraries if lib.id not in tokens]
        if added:
            tokens.update(self._current_tokens(added))
        # Read now, committed only with the last page, so a crash before then reads it again.
        regranted, site_token = self._regranted(libraries, tokens.get(SITE_TOKEN))
        expired: list[LibraryRef] = []
        decided: set[str] = set()
        for lib in libraries:
            if lib in added:
                continue
            try:
                for page in self._change_log(lib, tokens, known):
                    decided.update(c.doc_id for c in page.changes)
                    yield page
            except ChangeLogExpired:
                expired.append(lib)
        moved = site_token != tokens.get(SITE_TOKEN)
        tokens[SITE_TOKEN] = site_token
        if added or expired:
            fresh = self._current_tokens(expired)
            since = {lib.id: _ticks_to_datetime(tokens[lib.id]["token"]) for lib in expired}
            tokens.update(fresh)
            yield from self._catch_up(libraries, added, since, tokens, known)
        elif regranted:
            yield from self._ending_with(self._reader_pages(
                [lib for lib in libraries if lib.id in regranted], known, decided),
                {"libraries": dict(tokens)})
        elif moved:
            yield ChangePage(changes=[], cursor={"libraries": dict(tokens)})

    def _pages_of_items(self, lib: LibraryRef, fields: list[str], after: int = 0,
                        modified_since: datetime | None = None
                        ) -> Iterator[tuple[list[dict], bool]]:
        """The library's items a page at a time ($top, then the server's __next link), so a
        library of any size never sits in memory whole; each with whether more follow."""
        next_url: str | None = None
        first = True
        while first or next_url:
            found: dict[str, Any] = {}

            def one_page(url: str | None = next_url, found: dict = found) -> None:
                # Built afresh for every try: the library drops a query once it has run.
                items = self.context.web.lists.get_by_id(lib.id).items.select(fields)
                items.top(self.page_size)
                if modified_since is not None:
                    items.filter(f"Modified ge datetime'{modified_since:%Y-%m-%dT%H:%M:%SZ}'")
                items.get().after_execute(
                    lambda response: found.update(
                        next=(response.json().get("d") or {}).get("__next")),
                    include_response=True)
                if url is not None:
                    items.before_execute(lambda request: setattr(request, "url", url))
                elif after:  # resuming an enumeration: SharePoint's own paging token
                    items.before_execute(lambda request: setattr(
                        request, "url",
                        f"{request.url}&%24skiptoken=Paged%3dTRUE%26p_ID%3d{after}"))
                items.execute_query()
                found["rows"] = [dict(item.properties) for item in items]

            self._call(one_page, lib.title)
            first = False
            next_url = found.get("next")
            yield found["rows"], bool(next_url)

    def _enumerate(self, libraries: list[LibraryRef], tokens: dict[str, dict[str, str]],
                   known: Mapping[str, KnownDocument], listing: dict | None
                   ) -> Iterator[ChangePage]:
        order = [lib.id for lib in libraries]
        resume_at = order.index(listing["library"]) if listing and listing.get(
            "library") in order else 0
        done = {"libraries": tokens}
        seen: set[str] = set()
        for index, lib in enumerate(libraries):
            if index < resume_at:
                continue
            after = int(listing.get("after", 0)) if listing and index == resume_at else 0
            for rows, more in self._pages_of_items(lib, ITEM_FIELDS, after):
                page = self._page(lib, rows, known, seen)
                last = not more and index == len(libraries) - 1
                if last and not listing and not set(known) - seen:
                    page.cursor = done  # the listing is complete once this page is committed
                    yield page
                    return
                if rows:
                    page.cursor = {**done, "listing": {"library": lib.id,
                                                       "after": int(rows[-1]["Id"])}}
                    yield page
        if listing:  # resumed: what was listed before the interruption is not in `seen`
            seen = {self._doc_id(row) for lib in libraries
                    for rows, _ in self._pages_of_items(lib, KEY_FIELDS) for row in rows
                    if not self._is_folder(row)}
        yield from self._ending_with(self._deletions(sorted(set(known) - seen)), done)

    def _deletions(self, gone: list[str]) -> Iterator[ChangePage]:
        for start in range(0, len(gone), self.page_size):
            yield ChangePage([Change(d, ChangeKind.DELETED)
                              for d in gone[start:start + self.page_size]])

    @staticmethod
    def _ending_with(pages: Iterator[ChangePage], cursor: Cursor) -> Iterator[ChangePage]:
        """`pages` (deletions, which a sync holds until the listing ends anyway), the last
        carrying `cursor`, or an empty page carrying it when there are none."""
        held: ChangePage | None = None
        for page in pages:
            if held is not None:
                yield held
            held = page
        if held is None:
            held = ChangePage(changes=[])
        held.cursor = cursor
        yield held

    def _change_log(self, lib: LibraryRef, tokens: dict[str, dict[str, str]],
                    known: Mapping[str, KnownDocument]) -> Iterator[ChangePage]:
        """The library's change log since its token, a page of entries at a time."""
        while True:
            start = tokens[lib.id]["token"]
            query = ChangeQuery(
                Item=True, File=True, Folder=True, Add=True, Update=True, DeleteObject=True,
                Rename=True, Move=True, Restore=True, SystemUpdate=True, SecurityPolicy=True,
                RoleAssignmentAdd=True, RoleAssignmentDelete=True,
                ChangeTokenStart=ChangeToken(start), FetchLimit=str(self.page_size))
            try:
                entries = self._call(
                    lambda query=query: self.context.web.lists.get_by_id(lib.id)
                    .get_changes(query).execute_query(), lib.title)
            except SourceError as error:
                if EXPIRED_TOKEN.lower() in error.log_message.lower():
                    raise ChangeLogExpired(lib.title) from error
                raise
            entries = list(entries)
            if not entries:
                return
            page = self._apply_changes(lib, [e.properties for e in entries], known)
            tokens[lib.id] = {"token": _token_value(entries[-1].properties.get("ChangeToken"))}
            page.cursor = {"libraries": dict(tokens)}
            yield page
            if len(entries) < self.page_size:
                return

    def _regranted(self, libraries: list[LibraryRef], start: dict[str, str] | None
                   ) -> tuple[set[str], dict[str, str]]:
        """The libraries whose inherited readers may have changed since `start`, by the site's
        change log (every library when the site's own readers changed, or when the log cannot
        say: no token kept, or one older than the log), and the site's token now."""
        every = {lib.id for lib in libraries}
        if not start:
            return every, self._site_token()
        token, found = start["token"], set()
        while True:
            query = ChangeQuery(
                Web=True, List=True, RoleAssignmentAdd=True, RoleAssignmentDelete=True,
                RoleDefinitionAdd=True, RoleDefinitionDelete=True, RoleDefinitionUpdate=True,
                ChangeTokenStart=ChangeToken(token), FetchLimit=str(self.page_size))
            try:
                entries = list(self._call(
                    lambda query=query: self.context.web.get_changes(query).execute_query()))
            except SourceError as error:
                if EXPIRED_TOKEN.lower() in error.log_message.lower():
                    return every, self._site_token()
                raise
            for entry in entries:
                kind = entry.properties.get("ChangeType")
                if int(getattr(kind, "value", kind) or 0) not in REGRANTING:
                    continue
                list_id = str(entry.properties.get("ListId") or "").lower()
                found |= {list_id} & every if list_id else every
            if entries:
                token = _token_value(entries[-1].properties.get("ChangeToken"))
            if len(entries) < self.page_size:
                return found, {"token": token}

    def _reader_pages(self, libraries: list[LibraryRef], known: Mapping[str, KnownDocument],
                      decided: set[str], present: set[str] | None = None
                      ) -> Iterator[ChangePage]:
        """PERMISSIONS changes for the known items of `libraries` whose readers differ from
        the index's (those `decided` by this run already are left alone); the doc ids listed
        are added to `present`."""
        self._acl_cache.clear()
        for lib in libraries:
            for rows, _ in self._pages_of_items(lib, ITEM_FIELDS):
                page = ChangePage(changes=[])
                for row in rows:
                    if self._is_folder(row):
                        continue
                    doc_id = self._doc_id(row)
                    if present is not None:
                        present.add(doc_id)
                    if doc_id in decided or doc_id not in known:
                        continue
                    readers = self._readers(lib, row)
                    if sorted(known[doc_id].principals) != list(readers):
                        page.changes.append(Change(doc_id, ChangeKind.PERMISSIONS,
                                                   known[doc_id].version,
                                                   self._fingerprint(lib, row), readers))
                if page.changes:
                    yield page

    def _apply_changes(self, lib: LibraryRef, entries: list[dict],
                       known: Mapping[str, KnownDocument]) -> ChangePage:
        """What a page of change-log entries means, judged on each item's state now."""
        page = ChangePage(changes=[])
        actions: dict[int, tuple[str, dict]] = {}
        for entry in entries:
            change_type = entry.get("ChangeType")
            change_type = getattr(change_type, "value", change_type)
            action = CHANGE_TYPES.get(int(change_type or 0))
            if action is None or entry.get("ItemId") is None:
                continue
            actions[int(entry["ItemId"])] = (action, entry)
        decided: dict[str, Change | None] = {}
        for item_id, (action, entry) in actions.items():
            row = self._item(lib, item_id)
            if row is None:
                doc_id = str(entry.get("UniqueId") or "").lower()
                if doc_id in known:
                    decided[doc_id] = Change(doc_id, ChangeKind.DELETED)
                continue
            if self._is_folder(row):
                if action != GONE:  # a folder's readers (or place) changed: so did its files'
                    self._acl_cache.clear()
                    for rows, _ in self._pages_of_items(lib, ITEM_FIELDS):
                        for child in rows:
                            if (not self._is_folder(child) and str(child["FileRef"]).startswith(
                                    f"{row['FileRef']}/")):
                                decided[self._doc_id(child)] = self._compare(lib, child, known)
                continue
            self._acl_cache.pop(str(row["FileRef"]), None)
            decided[self._doc_id(row)] = self._compare(lib, row, known)
        for change in decided.values():
            if change is None:
                page.unchanged += 1
            else:
                page.changes.append(change)
        return page

    def _catch_up(self, libraries: list[LibraryRef], added: list[LibraryRef],
                  since: dict[str, datetime], tokens: dict[str, dict[str, str]],
                  known: Mapping[str, KnownDocument]) -> Iterator[ChangePage]:
        """Libraries without a usable change log: what was modified since the token's time
        (everything, for a library new to this source), then one pass over every library's
        keys and readers, because deletions and permission changes do not move `Modified`."""
        present: set[str] = set()
        decided: set[str] = set()
        for lib in libraries:
            if lib not in added and lib.id not in since:
                continue
            cutoff = None if lib in added else since[lib.id] - CLOCK_SKEW
            for rows, _ in self._pages_of_items(lib, ITEM_FIELDS, modified_since=cutoff):
                page = self._page(lib, rows, known, decided)
                yield page
        yield from self._reader_pages(libraries, known, decided, present)
        yield from self._ending_with(self._deletions(sorted(set(known) - present)),
                                     {"libraries": dict(tokens)})

    # -- one item ----------------------------------------------------------------------------

    @staticmethod
    def _is_folder(row: Mapping[str, Any]) -> bool:
        return str(row.get("FSObjType", "0")) == "1"

    @staticmethod
    def _doc_id(row: Mapping[str, Any]) -> str:
        return str(row["UniqueId"]).lower()

    def _fingerprint(self, lib: LibraryRef, row: Mapping[str, Any]) -> str:
        # The path is part of it: a move or rename keeps the doc id but changes the url.
        where = hashlib.sha256(str(row["FileRef"]).encode()).hexdigest()[:16]
        return f"{lib.id}:{row['Id']}:{row.get('File_x0020_Size') or 0}:{where}"

    def _item(self, lib: LibraryRef, item_id: int) -> dict | None:
        try:
            item = self.backoff.run(
                lambda: self.context.web.lists.get_by_id(lib.id).items.get_by_id(item_id)
                .select(ITEM_FIELDS).get().execute_query(), self._classify, "SharePoint")
        except ClientRequestException as error:
            if _status(error) == 404:
                return None
            raise self._explain(error, lib.title) from error
        except requests.RequestException as error:
            raise self._explain(error, lib.title) from error
        return dict(item.properties)

    def _page(self, lib: LibraryRef, rows: Iterable[dict[str, Any]],
              known: Mapping[str, KnownDocument], seen: set[str]) -> ChangePage:
        """The files of one page of list items compared with the index; their ids go to `seen`."""
        page = ChangePage(changes=[])
        for row in rows:
            if self._is_folder(row):
                continue
            seen.add(self._doc_id(row))
            change = self._compare(lib, row, known)
            if change is None:
                page.unchanged += 1
            else:
                page.changes.append(change)
        return page

    def _compare(self, lib: LibraryRef, row: Mapping[str, Any],
                 known: Mapping[str, KnownDocument]) -> Change | None:
        doc_id = self._doc_id(row)
        version = str(row.get("OData__UIVersionString") or row.get("Modified"))
        fingerprint = self._fingerprint(lib, row)
        readers = self._readers(lib, row)
        self._entries[doc_id] = Entry(
            lib, int(row["Id"]), str(row["FileRef"]),
            str(row.get("Title") or "") if lib.pages else "",
            int(row.get("File_x0020_Size") or 0), _parse_time(row.get("Modified")))
        held = known.get(doc_id)
        if held is None or held.quarantined:
            return Change(doc_id, ChangeKind.ADDED, version, fingerprint, readers)
        if held.version != version or held.fingerprint != fingerprint:
            return Change(doc_id, ChangeKind.MODIFIED, version, fingerprint, readers)
        if sorted(held.principals) != list(readers):
            return Change(doc_id, ChangeKind.PERMISSIONS, version, fingerprint, readers)
        return None

    # -- readers -----------------------------------------------------------------------------

    def _readers(self, lib: LibraryRef, row: Mapping[str, Any]) -> tuple[str, ...]:
        """Who may read an item: its own role assignments if it has unique ones, else those of
        the nearest folder above that has, else the library's, else the site's."""
        if row.get("HasUniqueRoleAssignments"):
            item_id = int(row["Id"])
            return self._assigned(lambda: self.context.web.lists.get_by_id(lib.id)
                                  .get_item_by_id(item_id).role_assignments, lib.title)
        return self._folder_readers(lib, str(row["FileDirRef"]))

    def _folder_readers(self, lib: LibraryRef, folder: str) -> tuple[str, ...]:
        if folder in self._acl_cache:
            return self._acl_cache[folder]
        if folder.rstrip("/").lower() == lib.root.rstrip("/").lower():
            lst = self._call(lambda: self.context.web.lists.get_by_id(lib.id).get()
                             .select(["HasUniqueRoleAssignments"]).execute_query(), lib.title)
            if lst.properties.get("HasUniqueRoleAssignments"):
                readers = self._assigned(lambda: self.context.web.lists.get_by_id(lib.id)
                                         .role_assignments, lib.title)
            else:
                readers = self._assigned(lambda: self.context.web.role_assignments, lib.title)
        else:
            item = self._call(lambda: self.context.web.get_folder_by_server_relative_url(folder)
                              .list_item_all_fields.select(["Id", "HasUniqueRoleAssignments"])
                              .get().execute_query(), lib.title)
            if item.properties.get("HasUniqueRoleAssignments"):
                item_id = int(item.properties["Id"])
                readers = self._assigned(lambda: self.context.web.lists.get_by_id(lib.id)
                                         .get_item_by_id(item_id).role_assignments, lib.title)
            else:
                readers = self._folder_readers(lib, folder.rsplit("/", 1)[0])
        self._acl_cache[folder] = readers
        return readers

    def _assigned(self, assignments: Callable[[], Any], library: str) -> tuple[str, ...]:
        found = self._call(lambda: assignments().expand(["Member", "RoleDefinitionBindings"])
                           .get().execute_query(), library)
        readers: set[str] = set()
        for assignment in found:
            props = assignment.properties
            bindings = props.get("RoleDefinitionBindings")
            roles = [b.properties for b in bindings] if bindings is not None else []
            if not any(self._grants_read(role) for role in roles):
                continue
            member = props.get("Member")
            principal = self._principal(member.properties if member is not None else {})
            if principal:
                readers.add(principal)
        return tuple(sorted(readers))

    @staticmethod
    def _grants_read(role: Mapping[str, Any]) -> bool:
        permissions = role.get("BasePermissions")
        low = permissions.get("Low") if isinstance(permissions, dict) else getattr(
            permissions, "Low", None)
        if low not in (None, ""):
            return bool(int(low) & VIEW_LIST_ITEMS)
        kind = role.get("RoleTypeKind")
        return int(getattr(kind, "value", kind) or 0) in READ_ROLE_KINDS

    @staticmethod
    def _principal(member: Mapping[str, Any]) -> str | None:
        """users -> user:<email>; SharePoint groups and Entra ID security groups ->
        group:<title>, the names a caller's token carries."""
        kind = member.get("PrincipalType")
        kind = int(getattr(kind, "value", kind) or 0)
        if kind == PRINCIPAL_USER:
            email = member.get("Email") or str(member.get("LoginName", "")).rsplit("|", 1)[-1]
            return f"user:{email.lower()}" if email else None
        if kind in (PRINCIPAL_SECURITY_GROUP, PRINCIPAL_SHAREPOINT_GROUP):
            return f"group:{member['Title']}" if member.get("Title") else None
        return None

    # -- content -----------------------------------------------------------------------------

    def fetch(self, change: Change) -> SourceDocument:
        entry = self._entries.get(change.doc_id) or self._locate(change)
        if entry.size > self.config.max_bytes:
            raise DocumentRejected(
                "fetch", f"file too large: {entry.size / 1e6:.1f} MB is over the "
                         f"{self.config.max_bytes / 1e6:.1f} MB limit")
        leaf = entry.url.rsplit("/", 1)[-1]
        if entry.library.pages:
            row = self._item(entry.library, entry.item_id)
            if row is None:
                raise DocumentRejected("fetch", "page disappeared during the sync")
            page = self._call(lambda: self.context.web.lists.get_by_id(entry.library.id)
                              .items.get_by_id(entry.item_id).select(["CanvasContent1",
                                                                      "Title"]).get()
                              .execute_query(), entry.library.title)
            html = page.properties.get("CanvasContent1") or ""
            title = page.properties.get("Title") or leaf.rsplit(".", 1)[0]
            content, mime = f"<html><body>{html}</body></html>".encode(), "text/html"
        else:
            content = self._download(entry)
            title = leaf.rsplit(".", 1)[0].replace("-", " ").strip() or leaf
            mime = mime_for(leaf)
        return SourceDocument(
            source=self.name, doc_id=change.doc_id, title=title,
            url=f"{self.host}{entry.url}", mime_type=mime, content=content,
            modified=entry.modified, version=change.version or "",
            principals=list(change.principals),
            metadata={"library": entry.library.title, "path": entry.url,
                      "item_id": str(entry.item_id)})

    def _download(self, entry: Entry) -> bytes:
        try:
            result = self.backoff.run(
                lambda: self.context.web.get_file_by_server_relative_url(entry.url)
                .get_content().execute_query(), self._classify, "SharePoint")
        except ClientRequestException as error:
            if _status(error) == 404:
                raise DocumentRejected("fetch", "file disappeared during the sync") from error
            raise self._explain(error, entry.library.title) from error
        except requests.RequestException as error:
            raise self._explain(error, entry.library.title) from error
        return bytes(result.value or b"")

    def _locate(self, change: Change) -> Entry:
        """An item not listed by this connector object (a fetch in another process): its
        library and item id are in the fingerprint."""
        list_id, item_id = (change.fingerprint or "::").split(":")[:2]
        lib = next((x for x in self._libraries() if x.id == list_id), None)
        row = self._item(lib, int(item_id)) if lib and item_id.isdigit() else None
        if lib is None or row is None:
            raise DocumentRejected("fetch", "item disappeared during the sync")
        return Entry(lib, int(row["Id"]), str(row["FileRef"]), str(row.get("Title") or ""),
                     int(row.get("File_x0020_Size") or 0), _parse_time(row.get("Modified")))
