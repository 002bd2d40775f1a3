"""A Confluence source (Cloud or Data Center): the pages, blog posts and attachments of spaces."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import requests
from atlassian import Confluence
from atlassian.errors import ApiError
from bs4 import BeautifulSoup, NavigableString, Tag

from connectors.base import (
    Backoff,
    Change,
    ChangeKind,
    ChangePage,
    ConnectionCheck,
    Cursor,
    Retry,
    listing_pages,
    retry_after_seconds,
)
from headwater.config import ConfigError, SourceConfig
from headwater.errors import HeadwaterError, SourceError, TransientError
from headwater.records import PUBLIC, SourceDocument
from headwater.state import KnownDocument
from tasks.parse import PARSERS, DocumentRejected, mime_for

T = TypeVar("T")

DEPLOYMENTS = ("cloud", "datacenter")
CONTENT_TYPES = ("page", "blogpost", "attachment")
GONE_STATUSES = ("trashed", "archived")
# CQL compares times to the minute, in the search user's time zone.
CQL_MINUTE = "%Y-%m-%d %H:%M"

# What an HTTP status from Confluence means for a sync: wait and retry, or tell a person.
RETRY_STATUSES = {429, 500, 502, 503, 504}
EXPLAINED_STATUSES = {
    401: "Confluence refused the credentials for {user}",
    403: "{user} may not read {what} in Confluence",
    404: "{what} does not exist or is not visible to {user}",
}


def _response(error: BaseException | None) -> requests.Response | None:
    """The HTTP response behind a library error (it wraps some 404s in ApiError)."""
    if isinstance(error, ApiError):
        error = error.reason
    if isinstance(error, requests.HTTPError):
        return error.response
    return None


def _status(error: BaseException | None) -> int | None:
    response = _response(error)
    return None if response is None else response.status_code


def _throttled(error: Exception) -> Retry | None:
    """Backoff's classifier: throttling and server hiccups are retried, as the server asks."""
    response = _response(error)
    if response is None or response.status_code not in RETRY_STATUSES:
        return None
    return Retry(retry_after_seconds(response.headers.get("Retry-After")))


def _when(content: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(content["version"]["when"]).astimezone(UTC)


def _minute(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(CQL_MINUTE)


@dataclass
class _Listing:
    """One run's view of readers: restrictions and space permissions are asked once each."""

    restrictions: dict[str, frozenset[str]] = field(default_factory=dict)
    spaces: dict[str, tuple[str, ...]] = field(default_factory=dict)
    chains: dict[str, list[str]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)


class ConfluenceConnector:
    """Finds changes with a CQL `lastmodified` cursor and deletions by periodic id reconciliation.

    Readers are the space's read permission, narrowed by the read restrictions of the page and
    every ancestor; restriction changes do not move `lastmodified`, so the reconciliation (which
    resolves every page's readers) is what reports them.

    params: `url` (Cloud: https://<site>.atlassian.net/wiki), `deployment` (cloud|datacenter),
    `spaces` (keys); Cloud: `email` and `api_token`, Data Center: `token` (a personal access
    token) and optionally `username` (named in messages); optional `reconcile_every_s` (3600),
    `margin_s` (120), `timezone` (the search user's, for CQL times; UTC). Waits on throttling
    follow the source's `throttling` settings.
    """

    def __init__(self, config: SourceConfig, client: Any = None) -> None:
        self.name = config.name
        self.config = config
        params = config.params
        self.deployment: str = params.get("deployment", "cloud")
        if self.deployment not in DEPLOYMENTS:
            raise ConfigError(f"source {config.name!r}: params.deployment must be one of "
                              f"{list(DEPLOYMENTS)}, not {self.deployment!r}")
        if not params.get("url") or not params.get("spaces"):
            raise ConfigError(f"source {config.name!r}: params.url and params.spaces are needed")
        self.url: str = str(params["url"]).rstrip("/")
        self.spaces: list[str] = [str(key) for key in params["spaces"]]
        self.page_size = min(config.batch_size, 200)  # Confluence caps a search page at 200
        # Restriction changes bump no version and no lastmodified: only the reconciliation sees
        # them, so it runs hourly by default (readers are at most that stale).
        self.reconcile_every = timedelta(seconds=float(params.get("reconcile_every_s", 3600)))
        self.margin = timedelta(seconds=float(params.get("margin_s", 120)))
        self.timezone = ZoneInfo(params.get("timezone", "UTC"))
        self.backoff = Backoff(**config.throttling.model_dump())
        if self.deployment == "cloud":
            if not params.get("email"):
                raise ConfigError(f"source {config.name!r}: Confluence Cloud needs params.email")
            self.user: str = params["email"]
        else:
            self.user = params.get("username", "the personal access token")
        self.client = client or self._open_client()

    def _open_client(self) -> Any:
        # The library's Cloud client speaks REST v2, which has no CQL content search and no
        # restrictions by operation; Cloud still serves REST v1 under /wiki/rest/api, which
        # is what its Server client speaks. Both deployments use that one, differing only in
        # URL and credentials. Its own 429 sleeping is off: `Backoff` decides every wait.
        common = {"cloud": False, "timeout": 60, "retry_with_header": False,
                  "backoff_and_retry": False}
        if self.deployment == "cloud":
            return Confluence(self.url, username=self.user,
                              password=self.config.secret("api_token").get_secret_value(),
                              **common)
        return Confluence(self.url, token=self.config.secret("token").get_secret_value(),
                          **common)

    # -- calls and their errors ----------------------------------------------------------------

    def _describe(self, error: Exception, what: str) -> tuple[str, bool]:
        """One line a person can act on, and whether retrying may cure it."""
        status = _status(error)
        if status in RETRY_STATUSES:
            return f"Confluence at {self.url} is throttling or unavailable ({status})", True
        if status in EXPLAINED_STATUSES:
            return EXPLAINED_STATUSES[status].format(user=self.user, what=what), False
        if isinstance(error, (requests.ConnectionError, requests.Timeout)):
            return f"Confluence at {self.url} cannot be reached", True
        if status is not None:
            return f"Confluence refused a request for {what} (HTTP {status})", False
        return f"Confluence failed: {type(error).__name__}", False

    def _call(self, operation: Callable[[], T], what: str) -> T:
        """`operation()` against Confluence, waited out while throttled, else explained."""
        try:
            return self.backoff.run(operation, _throttled,
                                    f"source {self.name!r}: Confluence at {self.url}")
        except (requests.RequestException, ApiError) as error:
            message, transient = self._describe(error, what)
            kind = TransientError if transient else SourceError
            raise kind(f"source {self.name!r}: {message}", repr(error)) from error

    def test_connection(self) -> ConnectionCheck:
        try:
            self._call(self.client.get_current_user, "the current user")
            for key in self.spaces:
                self._call(lambda key=key: self.client.get_space(key), f"space {key}")
        except HeadwaterError as error:
            prefix = f"source {self.name!r}: "
            return ConnectionCheck(False, error.user_message.removeprefix(prefix))
        return ConnectionCheck(True, f"spaces {', '.join(self.spaces)} are readable as "
                                     f"{self.user}")

    # -- readers -------------------------------------------------------------------------------

    def _user_principal(self, user: dict[str, Any]) -> str | None:
        name = user.get("email") or user.get("username") or user.get("accountId")
        return f"user:{name}" if name else None

    def _space_readers(self, listing: _Listing, key: str) -> tuple[str, ...]:
        if key not in listing.spaces:
            found = (self._cloud_space_readers(key) if self.deployment == "cloud"
                     else self._datacenter_space_readers(key))
            listing.spaces[key] = tuple(sorted(found))
        return listing.spaces[key]

    def _cloud_space_readers(self, key: str) -> set[str]:
        space = self._call(lambda: self.client.get_space(key, expand="permissions"),
                           f"space {key}")
        found: set[str] = set()
        for permission in space.get("permissions", []):
            operation = permission.get("operation", {})
            if (operation.get("operation"), operation.get("targetType")) != ("read", "space"):
                continue
            if permission.get("anonymousAccess"):
                found.add(PUBLIC)
            subjects = permission.get("subjects", {})
            for user in subjects.get("user", {}).get("results", []):
                found.add(self._user_principal(user) or "")
            for group in subjects.get("group", {}).get("results", []):
                found.add(f"group:{group['name']}")
        return found - {""}

    def _datacenter_space_readers(self, key: str) -> set[str]:
        granted = self._call(lambda: self.client.get_all_space_permissions(key), f"space {key}")
        found: set[str] = set()
        for permission in granted:
            operation = permission.get("operation", {})
            if (operation.get("operationKey"), operation.get("targetType")) != ("read", "space"):
                continue
            subject = permission.get("subject", {})
            if subject.get("type") == "group":
                found.add(f"group:{subject['name']}")
            elif subject.get("type") == "user":
                # Data Center names users here by key only; their username is one call away.
                user = self._call(
                    lambda s=subject: self.client.get_user_details_by_userkey(s["userKey"]),
                    f"a user of space {key}")
                found.add(self._user_principal(user) or "")
            elif subject.get("type") == "anonymous":
                found.add(PUBLIC)
        return found - {""}

    def _restriction(self, listing: _Listing, content_id: str) -> frozenset[str]:
        """Who a page's own read restriction admits; empty when it has none."""
        if content_id not in listing.restrictions:
            by_operation = self._call(
                lambda: self.client.get_all_restrictions_for_content(content_id),
                f"the restrictions of content {content_id}")
            read = by_operation.get("read", {}).get("restrictions", {})
            users = [self._user_principal(u) for u in read.get("user", {}).get("results", [])]
            groups = [f"group:{g['name']}" for g in read.get("group", {}).get("results", [])]
            listing.restrictions[content_id] = frozenset(p for p in users + groups if p)
        return listing.restrictions[content_id]

    def _chain(self, listing: _Listing, content: dict[str, Any]) -> list[str]:
        """The ids whose read restrictions apply to content: its page's ancestors, then it."""
        if content["type"] == "attachment":
            page_id = str(content["container"]["id"])
            if page_id not in listing.chains:
                page = self._call(
                    lambda: self.client.get_page_by_id(page_id, expand="ancestors"),
                    f"page {page_id}")
                listing.chains[page_id] = self._chain(listing, page)
            return listing.chains[page_id]
        chain = [str(a["id"]) for a in content.get("ancestors", [])] + [str(content["id"])]
        listing.chains[str(content["id"])] = chain
        return chain

    def _readers(self, listing: _Listing, content: dict[str, Any]) -> tuple[str, ...]:
        """The space's readers, or, once anything up the tree is restricted, who passes every
        restriction (a group named in a restriction is taken to have the space's access)."""
        admitted: frozenset[str] | None = None
        for content_id in self._chain(listing, content):
            restriction = self._restriction(listing, content_id)
            if restriction:
                admitted = restriction if admitted is None else admitted & restriction
        if admitted is None:
            return self._space_readers(listing, content["space"]["key"])
        return tuple(sorted(admitted))

    # -- listing -------------------------------------------------------------------------------

    def _doc_id(self, content: dict[str, Any]) -> str:
        return f"{content['space']['key']}/{content['id']}"

    def _indexable(self, content: dict[str, Any]) -> bool:
        # Attachments our parsers cannot read (images, archives) never become documents.
        return content["type"] != "attachment" or mime_for(content["title"]) in PARSERS

    def _search(self, cql: str, expand: str) -> Iterator[tuple[list[dict[str, Any]], bool]]:
        """Every page of a CQL content search, following `_links.next` to the last page, and
        whether it is the last."""
        paging: dict[str, Any] = {"start": 0}
        while True:
            found = self._call(
                lambda paging=paging: self.client.search_content(
                    cql, limit=self.page_size, expand=expand, **paging),
                f"spaces {', '.join(self.spaces)}")
            query = parse_qs(urlsplit(found.get("_links", {}).get("next") or "").query)
            # Data Center pages by `start`, Cloud by an opaque `cursor`; the link says which.
            paging = {k: query[k][0] for k in ("start", "cursor") if k in query}
            yield found.get("results", []), not paging
            if not paging:
                return

    def _compare(self, listing: _Listing, content: dict[str, Any],
                 known: KnownDocument | None) -> Change | None:
        doc_id = self._doc_id(content)
        if content.get("status", "current") in GONE_STATUSES:
            return Change(doc_id, ChangeKind.DELETED) if known is not None else None
        version = str(content["version"]["number"])
        size = content.get("extensions", {}).get("fileSize", 0)
        fingerprint = f"{size}:{content['version']['when']}"
        principals = self._readers(listing, content)
        if known is None or known.quarantined:
            return Change(doc_id, ChangeKind.ADDED, version, fingerprint, principals)
        if known.version != version:
            return Change(doc_id, ChangeKind.MODIFIED, version, fingerprint, principals)
        if sorted(known.principals) != list(principals):
            return Change(doc_id, ChangeKind.PERMISSIONS, version, fingerprint, principals)
        return None

    def _cql(self, spaces: Iterable[str], extra: str = "") -> str:
        keys = ", ".join(f'"{key}"' for key in spaces)
        return f"space in ({keys}) and type in ({', '.join(CONTENT_TYPES)}){extra}"

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        started = datetime.now(UTC)
        cursor = cursor or {}
        reconciled = cursor.get("reconciled")
        due = (not cursor or reconciled is None
               or started - datetime.fromisoformat(reconciled) >= self.reconcile_every)
        listing, since = _Listing(), cursor.get("since")
        held: ChangePage | None = None
        for page, last in self._changed(listing, since, reconciled, known):
            since = (page.cursor or {}).get("since", since)
            if last and due:
                held = page  # it will carry the cursor that says the reconciliation is done
            else:
                yield page
        if not due:
            return
        for page in self._reconciliation(listing, known):
            if held is not None:
                yield held
            held = page
        if held is not None:
            # Stored only once the whole reconciliation is committed, so a crash repeats it.
            held.cursor = {"since": since, "reconciled": started.isoformat()}
            yield held

    def _changed(self, listing: _Listing, since: str | None, reconciled: str | None,
                 known: Mapping[str, KnownDocument]) -> Iterator[tuple[ChangePage, bool]]:
        """What CQL reports modified since the cursor (less a margin), oldest first, page by
        page, and whether the page is the last."""
        extra = f" and status in (current, {', '.join(GONE_STATUSES)})"
        if since is not None:
            start = datetime.strptime(since, CQL_MINUTE).replace(tzinfo=UTC) - self.margin
            extra += f' and lastmodified >= "{start.astimezone(self.timezone):{CQL_MINUTE}}"'
        cql = self._cql(self.spaces, extra) + " order by lastmodified asc"
        for results, last in self._search(cql, "space,version,ancestors,container"):
            page = ChangePage(changes=[])
            for content in results:
                if not self._indexable(content):
                    continue
                doc_id = self._doc_id(content)
                listing.seen.add(doc_id)
                change = self._compare(listing, content, known.get(doc_id))
                if change is None:
                    page.unchanged += 1
                else:
                    page.changes.append(change)
            times = [_when(c) for c in results]
            # Resuming from the last item's minute is safe only if nothing before it was newer.
            if times and max(times) == times[-1]:
                since = max(since or "", _minute(times[-1]))
            page.cursor = {"since": since, "reconciled": reconciled} if since else None
            yield page, last

    def _reconciliation(self, listing: _Listing,
                        known: Mapping[str, KnownDocument]) -> Iterator[ChangePage]:
        """Every current id of every space: what the index holds and Confluence lost is
        deleted, and readers are compared (restriction changes show up nowhere else)."""
        unseen = {d: k for d, k in known.items() if d not in listing.seen}

        def current() -> Iterator[tuple[str, Change | None]]:
            for key in self.spaces:
                cql = self._cql([key]) + " order by created asc"
                for results, _ in self._search(cql, "space,version,ancestors,container"):
                    for content in results:
                        doc_id = self._doc_id(content)
                        if self._indexable(content) and doc_id not in listing.seen:
                            yield doc_id, self._compare(listing, content, unseen.get(doc_id))

        yield from listing_pages(current(), unseen, self.page_size)

    # -- content -------------------------------------------------------------------------------

    def fetch(self, change: Change) -> SourceDocument:
        content_id = change.doc_id.split("/", 1)[1]
        try:
            content = self._call(
                lambda: self.client.get_page_by_id(
                    content_id, expand="body.storage,version,space,container"),
                f"content {content_id}")
        except SourceError as error:
            if _status(error.__cause__) == 404:
                raise DocumentRejected("fetch", "deleted or hidden during the sync") from error
            raise
        base = self.url
        if content["type"] == "attachment":
            size = int(content.get("extensions", {}).get("fileSize", 0))
            if size > self.config.max_bytes:
                raise DocumentRejected(
                    "fetch", f"file too large: {size / 1e6:.1f} MB is over the "
                             f"{self.config.max_bytes / 1e6:.1f} MB limit")
            link = content["_links"]["download"]
            data = self._call(
                lambda: self.client.get(base + link, absolute=True, not_json_response=True),
                f"attachment {content['title']}")
            mime = mime_for(content["title"])
        else:
            data = storage_to_markdown(content["body"]["storage"]["value"]).encode()
            mime = "text/markdown"
        version = content["version"]
        return SourceDocument(
            source=self.name,
            doc_id=change.doc_id,
            title=content["title"],
            url=base + content.get("_links", {}).get("webui", f"/pages/{content_id}"),
            mime_type=mime,
            content=data,
            modified=_when(content),
            author=(version.get("by") or {}).get("displayName"),
            version=str(version["number"]),
            principals=list(change.principals),
            metadata={"space": content["space"]["key"], "type": content["type"],
                      "id": content_id},
        )


# -- storage format ------------------------------------------------------------------------------

_BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "pre", "blockquote",
           "hr", "ac:structured-macro", "ac:macro", "ac:layout", "ac:layout-section",
           "ac:layout-cell", "ac:task-list", "div", "section", "ac:rich-text-body"}
# Macros whose parameters are their text (a status lozenge shows its title).
_TITLED_MACROS = {"status": "title"}
_CODE_MACROS = {"code", "noformat"}


def storage_to_markdown(storage: str) -> str:
    """Confluence storage format (XHTML with ac:/ri: elements) as markdown text: headings,
    paragraphs, lists and table rows; macros reduced to their text; no markup left."""
    soup = BeautifulSoup(storage, "html.parser")
    return "\n\n".join(b for b in _blocks(soup) if b.strip())


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\xa0", " ")).strip()


def _macro_name(tag: Tag) -> str:
    return str(tag.get("ac:name", "")).lower()


def _parameter(tag: Tag, name: str) -> str:
    for parameter in tag.find_all("ac:parameter", recursive=False):
        if parameter.get("ac:name") == name:
            return parameter.get_text()
    return ""


def _inline(node: Tag | NavigableString) -> str:
    """The text of inline content, whitespace squashed, macros reduced to their text."""
    if isinstance(node, NavigableString):
        return str(node)
    name = node.name or ""
    if name == "br":
        return "\n"
    if name in ("ac:parameter", "ac:placeholder", "ri:attachment", "ri:user", "ac:image"):
        return ""
    if name in ("ac:structured-macro", "ac:macro"):
        macro = _macro_name(node)
        if macro in _TITLED_MACROS:
            return " " + _parameter(node, _TITLED_MACROS[macro]) + " "
        return " ".join(_inline(c) for c in node.find_all(
            ["ac:rich-text-body", "ac:plain-text-body"], recursive=False))
    if name == "ac:link":
        body = node.find(["ac:link-body", "ac:plain-text-link-body"])
        if body is not None:
            return body.get_text()
        target = node.find("ri:page")
        return str(target.get("ri:content-title", "")) if target is not None else ""
    if name == "ac:emoticon":
        return str(node.get("ac:emoji-fallback", ""))
    return "".join(_inline(c) for c in node.children)


def _line(node: Tag | NavigableString) -> str:
    return "\n".join(_squash(part) for part in _inline(node).split("\n") if part.strip())


def _blocks(node: Tag, depth: int = 0) -> list[str]:
    """The blocks of a container, in order; loose inline content becomes a paragraph."""
    blocks: list[str] = []
    loose: list[Tag | NavigableString] = []

    def flush() -> None:
        text = "\n".join(_line(n) for n in loose).strip()
        if text:
            blocks.append(text)
        loose.clear()

    for child in node.children:
        if isinstance(child, Tag) and (child.name in _BLOCKS or child.name == "ac:task"):
            flush()
            blocks.extend(_block(child, depth))
        else:
            loose.append(child)
    flush()
    return blocks


def _block(tag: Tag, depth: int) -> list[str]:
    name = tag.name or ""
    if re.fullmatch(r"h[1-6]", name):
        return [f"{'#' * int(name[1])} {_squash(_inline(tag))}"]
    if name in ("ul", "ol", "ac:task-list"):
        return ["\n".join(_items(tag, depth))]
    if name == "table":
        rows = []
        for row in tag.find_all("tr"):
            cells = [_squash(_inline(c)) for c in row.find_all(["th", "td"], recursive=False)]
            rows.append("| " + " | ".join(cells) + " |")
        return ["\n".join(rows)]
    if name == "pre":
        return ["```\n" + tag.get_text().strip("\n") + "\n```"]
    if name == "blockquote":
        return ["\n".join("> " + line for b in _blocks(tag, depth) for line in b.split("\n"))]
    if name == "hr":
        return []
    if name in ("ac:structured-macro", "ac:macro"):
        return _macro(tag, depth)
    if name == "p":
        return [_line(tag)]
    return _blocks(tag, depth)


def _macro(tag: Tag, depth: int) -> list[str]:
    macro = _macro_name(tag)
    plain = tag.find("ac:plain-text-body", recursive=False)
    if macro in _CODE_MACROS and plain is not None:
        language = _parameter(tag, "language")
        return [f"```{language}\n{plain.get_text().strip(chr(10))}\n```"]
    if macro in _TITLED_MACROS:
        return [_squash(_parameter(tag, _TITLED_MACROS[macro]))]
    blocks: list[str] = []
    title = _parameter(tag, "title")
    if title:
        blocks.append(_squash(title))
    rich = tag.find("ac:rich-text-body", recursive=False)
    if rich is not None:
        blocks.extend(_blocks(rich, depth))
    elif plain is not None:
        blocks.append(plain.get_text().strip())
    return blocks


def _items(tag: Tag, depth: int) -> list[str]:
    lines = []
    ordered = tag.name == "ol"
    for number, item in enumerate(
            tag.find_all(["li", "ac:task"], recursive=False), start=1):
        nested = item.find_all(["ul", "ol", "ac:task-list"], recursive=False)
        body = item.find("ac:task-body") if item.name == "ac:task" else item
        parts = [c for c in (body.children if body is not None else [])
                 if not any(c is n for n in nested)]
        text = _squash(" ".join(_line(p) for p in parts))
        if item.name == "ac:task":
            done = item.find("ac:task-status")
            mark = "[x] " if done is not None and done.get_text() == "complete" else "[ ] "
            text = mark + text
        marker = f"{number}." if ordered else "-"
        lines.append(f"{'  ' * depth}{marker} {text}")
        for sub in nested:
            lines.extend(_items(sub, depth + 1))
    return lines
