"""A SQL database source (SQLAlchemy 2): the rows of a table or of one read-only SELECT."""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any
from uuid import UUID

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, Result, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from connectors.base import (
    Backoff,
    Change,
    ChangeKind,
    ChangePage,
    ConnectionCheck,
    Cursor,
    Retry,
    listing_pages,
)
from headwater.config import ConfigError, SourceConfig
from headwater.errors import HeadwaterError, SourceError, TransientError
from headwater.records import SourceDocument
from headwater.state import KnownDocument
from tasks.parse import DocumentRejected


class Disposition(Enum):
    RETRY = "retry"  # wait it out with the shared Backoff, then fail transiently
    TRANSIENT = "transient"  # fail now; a later run or task retry may succeed
    FAIL = "fail"  # a person must change something


@dataclass(frozen=True)
class Explanation:
    message: str  # may name {user}, {address}, {database}, {table}, {relation}, {column}
    disposition: Disposition


_REFUSED_CREDENTIALS = Explanation("the database refused the credentials for user {user}",
                                   Disposition.FAIL)
_UNREACHABLE = Explanation("database at {address} cannot be reached", Disposition.TRANSIENT)

# SQLSTATE codes (PostgreSQL's, shared by most servers) and what each means for a sync.
SQLSTATES: dict[str, Explanation] = {
    "28P01": _REFUSED_CREDENTIALS,
    "28000": _REFUSED_CREDENTIALS,
    "3D000": Explanation("database {database} does not exist", Disposition.FAIL),
    "42P01": Explanation("table {relation} does not exist", Disposition.FAIL),
    "3F000": Explanation("table {relation} does not exist", Disposition.FAIL),
    "42703": Explanation("column {column} does not exist in {table}", Disposition.FAIL),
    "42501": Explanation("user {user} may not read {table}", Disposition.FAIL),
    "42601": Explanation("the query is not valid SQL", Disposition.FAIL),
    "25006": Explanation("the query tried to write, and sources are read only", Disposition.FAIL),
    "40001": Explanation("the database aborted the read (serialization failure)",
                         Disposition.RETRY),
    "40P01": Explanation("the database aborted the read (deadlock)", Disposition.RETRY),
    "53300": Explanation("the database has too many connections", Disposition.RETRY),
    "57P03": Explanation("the database is starting up or shutting down", Disposition.RETRY),
    "57P01": Explanation("the database is shutting down", Disposition.TRANSIENT),
    "08001": _UNREACHABLE,
    "08006": _UNREACHABLE,
}

# What a driver says when it gives no SQLSTATE (SQLite, a connection never made); the first
# match wins, and a group in the pattern fills {column} or {relation}.
MESSAGES: list[tuple[re.Pattern[str], Explanation]] = [
    (re.compile(r"password authentication failed|authentication failed|access denied",
                re.IGNORECASE), _REFUSED_CREDENTIALS),
    (re.compile(r"no such table: (?P<relation>\S+)"),
     Explanation("table {relation} does not exist", Disposition.FAIL)),
    (re.compile(r"no such column: (?P<column>\S+)"),
     Explanation("column {column} does not exist in {table}", Disposition.FAIL)),
    (re.compile(r"too many (connections|clients)", re.IGNORECASE),
     Explanation("the database has too many connections", Disposition.RETRY)),
    (re.compile(r"database is locked|database table is locked"),
     Explanation("the database is locked by a writer", Disposition.RETRY)),
    (re.compile(r"readonly database|read-only transaction|query_only"),
     Explanation("the query tried to write, and sources are read only", Disposition.FAIL)),
    (re.compile(r"unable to open database file"),
     Explanation("database file {database} cannot be opened", Disposition.FAIL)),
    (re.compile(r"syntax error", re.IGNORECASE),
     Explanation("the query is not valid SQL", Disposition.FAIL)),
    (re.compile(r"connection refused|could not connect|timeout expired|no route to host|"
                r"could not translate host name|name or service not known|"
                r"server closed the connection|connection .* failed", re.IGNORECASE),
     _UNREACHABLE),
]

_NAMED = [re.compile(r'column "?(?:\w+\.)?(?P<column>[^"\s.]+)"? does not exist'),
          re.compile(r'relation "(?P<relation>[^"]+)" does not exist'),
          re.compile(r'schema "(?P<relation>[^"]+)" does not exist')]
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}

# Quoted text and comments cannot hide a second statement or a write from the check below.
_QUOTED_OR_COMMENT = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|--[^\n]*|/\*.*?\*/",
                                re.DOTALL)
_WRITING_WORDS = re.compile(
    r"\b(insert|update|delete|merge|upsert|into|create|alter|drop|truncate|grant|revoke|copy|"
    r"call|lock|vacuum|attach|detach|pragma|reindex)\b", re.IGNORECASE)

# Session settings that make a connection unable to write, whatever the query says.
_READ_ONLY_SESSION = {
    "sqlite": "PRAGMA query_only = ON",
}
_READ_ONLY_CONNECT_ARGS = {
    "postgresql": {"options": "-c default_transaction_read_only=on"},
}

_FALSY_TEXT = {"", "0", "f", "false", "n", "no", "off"}
_MIME_TYPES = {"text/plain", "text/markdown"}


def check_read_only_select(query: str) -> str:
    """The query without a trailing semicolon, or ConfigError if it is not one read-only SELECT.

    The database session is read only as well: this check gives a clear message early, it is
    not what keeps the source safe.
    """
    bare = _QUOTED_OR_COMMENT.sub(" ", query).strip().rstrip(";").strip()
    if ";" in bare:
        raise ConfigError("params.query must be a single statement; it holds several")
    first = re.match(r"[(\s]*(\w+)", bare)
    word = first.group(1) if first else ""
    if word.lower() not in ("select", "with"):
        raise ConfigError(f"params.query must be a read-only SELECT (or WITH ... SELECT); it "
                          f"starts with {word.upper() or 'nothing'}")
    writing = _WRITING_WORDS.search(bare)
    if writing:
        raise ConfigError(f"params.query must be a read-only SELECT; it contains "
                          f"{writing.group(1).upper()}")
    if not re.search(r"\bselect\b", bare, re.IGNORECASE):
        raise ConfigError("params.query must be a read-only SELECT; it has no SELECT")
    return query.strip().rstrip(";").rstrip()


def _template_columns(template: str) -> list[str]:
    """Columns a Python format template names ("{title}\\n\\n{body}" -> title, body)."""
    found = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        column = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if not column or column.isdigit():
            raise ConfigError(f"template {template!r} must name columns, as in {{title}}")
        if column not in found:
            found.append(column)
    return found


def _json_value(value: Any) -> Any:
    """A cursor or id value as JSON keeps it; bound back as is, the database casts it."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    return value


def _is_deleted(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in _FALSY_TEXT
    return bool(value)


def _modified(value: Any) -> datetime | None:
    """A cursor value as a time, if it is one; a timestamp without a zone is read as UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RenderedRow:
    """A row as the index sees it: its text, title and link, rendered once while listing."""

    doc_id: str
    text: str
    title: str
    url: str | None
    modified: datetime | None
    principals: tuple[str, ...]

    @property
    def version(self) -> str:
        # The rendered content is the version: a bumped updated_at alone changes nothing.
        return hashlib.sha256("\x1f".join((self.text, self.title, self.url or "")).encode()
                              ).hexdigest()


class DatabaseConnector:
    """Streams rows in (cursor column, id) order; deletions by soft-delete flag or key
    reconciliation; the content is rendered while listing, so `fetch` reads no row again."""

    def __init__(self, config: SourceConfig) -> None:
        self.name = config.name
        self.config = config
        params = config.params
        self.page_size = config.batch_size
        self.backoff = Backoff(**config.throttling.model_dump())
        self.url = self._url(params)
        self.dialect = self.url.get_backend_name()
        self.table: str | None = params.get("table")
        query: str | None = params.get("query")
        if (self.table is None) == (query is None):
            raise ConfigError(f"source {self.name!r}: give exactly one of params.table and "
                              "params.query")
        try:
            self.query = check_read_only_select(query) if query is not None else None
        except ConfigError as refused:
            raise ConfigError(f"source {self.name!r}: {refused.user_message}") from refused
        self.source_label = f"table {self.table}" if self.table else "the query"
        self.id_column: str = params.get("id_column", "id")
        if "text_template" not in params:
            raise ConfigError(f"source {self.name!r}: params.text_template is required, "
                              'e.g. "{title}\\n\\n{body}"')
        self.text_template: str = params["text_template"]
        self.title_template: str | None = params.get("title_template")
        self.url_template: str | None = params.get("url_template")
        self.cursor_column: str | None = params.get("cursor_column")
        self.soft_delete_column: str | None = params.get("soft_delete_column")
        self.principals_column: str | None = params.get("principals_column")
        self.reconcile_every_s = float(params.get("reconcile_every_s", 86400))
        self.mime_type: str = params.get("mime_type", "text/plain")
        if self.mime_type not in _MIME_TYPES:
            raise ConfigError(f"source {self.name!r}: params.mime_type must be one of "
                              f"{sorted(_MIME_TYPES)}, not {self.mime_type!r}")
        self.template_columns = [
            c for t in (self.text_template, self.title_template, self.url_template) if t
            for c in _template_columns(t)]
        self.columns = list(dict.fromkeys(c for c in (
            self.id_column, self.cursor_column, self.soft_delete_column,
            self.principals_column, *self.template_columns) if c))
        self.engine = self._engine()
        self._quote = self.engine.dialect.identifier_preparer.quote
        # Rendered rows of the page being synced, popped by `fetch`: never more than one page.
        self._page: dict[str, RenderedRow] = {}

    # -- connecting -----------------------------------------------------------------------

    def _url(self, params: Mapping[str, Any]) -> URL:
        if "url" not in params:
            raise ConfigError(f"source {self.name!r}: params.url is required (a SQLAlchemy URL "
                              "without the password)")
        try:
            url = make_url(params["url"])
        except ArgumentError as error:
            raise ConfigError(f"source {self.name!r}: params.url is not a SQLAlchemy URL",
                              str(error)) from error
        if url.password is not None:
            raise ConfigError(f"source {self.name!r}: params.url holds a password; write it "
                              "as params.password: {env: VAR} or {prefect_secret: name}")
        if "password" in params:
            url = url.set(password=self.config.secret("password").get_secret_value())
        database = url.database or ""
        if (url.get_backend_name() == "sqlite" and database and database != ":memory:"
                and not database.startswith("file:") and not Path(database).is_absolute()):
            url = url.set(database=str(self.config.base_dir / database))
        return url

    def _engine(self) -> Engine:
        try:
            # No pool: a sync opens a connection or two, and a long-lived worker keeps none.
            engine = create_engine(self.url, poolclass=NullPool,
                                   connect_args=_READ_ONLY_CONNECT_ARGS.get(self.dialect, {}))
        except (ArgumentError, NoSuchModuleError) as error:
            raise ConfigError(f"source {self.name!r}: no SQLAlchemy driver for "
                              f"{self.url.drivername}", str(error)) from error
        statement = _READ_ONLY_SESSION.get(self.dialect)
        if statement:
            @event.listens_for(engine, "connect")
            def _read_only(dbapi_connection: Any, _: object) -> None:
                cursor = dbapi_connection.cursor()
                cursor.execute(statement)
                cursor.close()
        return engine

    @property
    def _address(self) -> str:
        port = self.url.port or _DEFAULT_PORTS.get(self.dialect)
        return f"{self.url.host or 'localhost'}:{port}" if port else (self.url.host or "")

    def _missing_file(self) -> str | None:
        database = self.url.database or ""
        if self.dialect == "sqlite" and database and database != ":memory:" and (
                not database.startswith("file:") and not Path(database).is_file()):
            return f"database file {database} does not exist"
        return None

    # -- errors as data ---------------------------------------------------------------------

    def _explanation(self, error: BaseException) -> tuple[str, Disposition]:
        """One line a person can act on, and what a sync should do about it."""
        orig = getattr(error, "orig", None) or error
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        said = str(orig)
        fields = {"user": self.url.username or "(none)", "address": self._address,
                  "database": self.url.database or "", "table": self.table or "the query",
                  "relation": self.table or "named in the query", "column": "?"}
        for pattern in _NAMED:
            named = pattern.search(said)
            if named:
                fields.update(named.groupdict())
        explanation = SQLSTATES.get(state or "")
        if explanation is None:
            for pattern, candidate in MESSAGES:
                found = pattern.search(said)
                if found:
                    fields.update({k: v for k, v in found.groupdict().items() if v})
                    explanation = candidate
                    break
        if explanation is None:
            first_line = said.strip().splitlines()[0] if said.strip() else type(orig).__name__
            return f"the database failed: {first_line}", Disposition.FAIL
        return explanation.message.format(**fields), explanation.disposition

    def _explain(self, error: BaseException) -> HeadwaterError:
        message, disposition = self._explanation(error)
        kind = SourceError if disposition is Disposition.FAIL else TransientError
        return kind(f"source {self.name!r}: {message}", repr(error))

    def _classify(self, error: Exception) -> Retry | None:
        if not isinstance(error, DBAPIError):
            return None
        return Retry() if self._explanation(error)[1] is Disposition.RETRY else None

    def _open(self, statement: str, params: Mapping[str, Any]) -> tuple[Connection, Result]:
        """A streamed result (server-side cursor), retried while the database throttles."""

        def attempt() -> tuple[Connection, Result]:
            connection = self.engine.connect()
            try:
                result = connection.execution_options(
                    stream_results=True, yield_per=self.page_size).execute(text(statement),
                                                                           dict(params))
            except BaseException:
                connection.close()
                raise
            return connection, result

        missing = self._missing_file()
        if missing:
            raise SourceError(f"source {self.name!r}: {missing}")
        try:
            return self.backoff.run(attempt, self._classify, describe=f"source {self.name!r}")
        except SQLAlchemyError as error:
            raise self._explain(error) from error

    # -- SQL -------------------------------------------------------------------------------

    @property
    def _from(self) -> str:
        if self.query is not None:
            return f"({self.query}) AS src"
        parts = self.table.split(".") if self.table else []
        return ".".join(self._quote(p) for p in parts) + " AS src"

    def _select(self, columns: list[str], where: str = "", order: list[str] | None = None,
                limit: int | None = None) -> str:
        q = self._quote
        sql = f"SELECT {', '.join('src.' + q(c) for c in columns)} FROM {self._from}"
        if where:
            sql += f" WHERE {where}"
        if order:
            sql += " ORDER BY " + ", ".join("src." + q(c) for c in order)
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql

    def _stream(self, statement: str, params: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
        connection, result = self._open(statement, params)
        try:
            with connection:
                yield from result.mappings()
        except SQLAlchemyError as error:
            raise self._explain(error) from error

    def _rows_after(self, cursor: Cursor | None) -> Iterator[Mapping[str, Any]]:
        """Rows in (cursor column, id) order after the cursor's row: ties never lose a row."""
        c, key = self._quote(self.cursor_column or ""), self._quote(self.id_column)
        where, params = f"src.{c} IS NOT NULL", {}
        if cursor and cursor.get("value") is not None:
            where += (f" AND ((src.{c} > :value) OR (src.{c} = :value AND src.{key} > :id))")
            params = {"value": cursor["value"], "id": cursor["id"]}
        order = [self.cursor_column or "", self.id_column]
        return self._stream(self._select(self.columns, where, order), params)

    # -- the connector ----------------------------------------------------------------------

    def test_connection(self) -> ConnectionCheck:
        missing = self._missing_file()
        if missing:
            return ConnectionCheck(False, missing)
        try:
            with self.engine.connect() as connection:
                found = list(connection.execute(
                    text(f"SELECT * FROM {self._from} LIMIT 0")).keys())
        except SQLAlchemyError as error:
            return ConnectionCheck(False, self._explanation(error)[0])
        for column in self.columns:
            if column not in found:
                return ConnectionCheck(False, f"column {column} does not exist in "
                                              f"{self.table or 'the query'}")
        return ConnectionCheck(True, f"{self.source_label} is readable "
                                     f"({len(found)} columns)")

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        if not self.cursor_column:
            # Without a cursor column every run reads every row; deletions by key difference.
            yield from listing_pages(self._full_listing(known), known, self.page_size)
            self._page = {}
            return
        yield from self._incremental(cursor, known)
        self._page = {}

    def _full_listing(
        self, known: Mapping[str, KnownDocument]
    ) -> Iterator[tuple[str, Change | None]]:
        rows = self._stream(self._select(self.columns, order=[self.id_column]), {})
        pending = 0
        for row in rows:
            doc_id = str(row[self.id_column])
            if pending >= self.page_size:
                # listing_pages has yielded the page the rows before were rendered for.
                self._page, pending = {}, 0
            if self.soft_delete_column and _is_deleted(row[self.soft_delete_column]):
                if doc_id in known:
                    pending += 1
                    yield doc_id, Change(doc_id, ChangeKind.DELETED)
                continue
            change = self._change(self._render(row), None, known.get(doc_id))
            pending += change is not None
            yield doc_id, change

    def _incremental(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        started = datetime.now(UTC).isoformat()
        reconciled_at = (cursor or {}).get("reconciled_at")
        # Without a stored cursor every row is read: whatever the index holds and no live row
        # names is gone, with no second pass over the keys.
        unseen: set[str] | None = set(known) if not cursor else None
        gone: set[str] = set()
        page, position = ChangePage(changes=[]), dict(cursor or {})
        self._page = {}
        for row in self._rows_after(cursor):
            doc_id = str(row[self.id_column])
            position = {"value": _json_value(row[self.cursor_column]),
                        "id": _json_value(row[self.id_column]), "reconciled_at": reconciled_at}
            if unseen is not None:
                unseen.discard(doc_id)
            if self.soft_delete_column and _is_deleted(row[self.soft_delete_column]):
                if doc_id in known and doc_id not in gone:
                    gone.add(doc_id)
                    page.changes.append(Change(doc_id, ChangeKind.DELETED))
            else:
                fingerprint = json.dumps(position["value"])
                change = self._change(self._render(row), fingerprint, known.get(doc_id))
                if change is None:
                    page.unchanged += 1
                else:
                    page.changes.append(change)
            if len(page.changes) >= self.page_size:
                page.cursor = position
                yield page
                page, self._page = ChangePage(changes=[]), {}
        deleted: list[Change] = []
        final = position if "value" in position else None
        if unseen is not None or self._reconciliation_due(reconciled_at):
            if unseen is None:
                unseen = self._unseen_keys(known)
            deleted = [Change(d, ChangeKind.DELETED) for d in sorted(unseen - gone)]
            final = {**position, "reconciled_at": started} if final else None
        changes = page.changes + deleted
        if not changes and not page.unchanged and final == (cursor or None):
            return
        # The last rows and the reconciled deletions share pages; only the last one moves the
        # cursor (and the time of the reconciliation) on.
        for start in range(0, max(len(changes), 1), self.page_size):
            last = start + self.page_size >= len(changes)
            yield ChangePage(changes=changes[start:start + self.page_size],
                             cursor=final if last else None,
                             unchanged=page.unchanged if start == 0 else 0)
            self._page = {}

    def _reconciliation_due(self, reconciled_at: str | None) -> bool:
        if not reconciled_at:
            return True
        elapsed = datetime.now(UTC) - datetime.fromisoformat(reconciled_at)
        return elapsed.total_seconds() >= self.reconcile_every_s

    def _unseen_keys(self, known: Mapping[str, KnownDocument]) -> set[str]:
        """What the index holds that no live row names any more (every key is streamed)."""
        unseen = set(known)
        columns = [c for c in (self.id_column, self.soft_delete_column) if c]
        where = f"src.{self._quote(self.cursor_column or '')} IS NOT NULL"
        for row in self._stream(self._select(columns, where), {}):
            if not (self.soft_delete_column and _is_deleted(row[self.soft_delete_column])):
                unseen.discard(str(row[self.id_column]))
        return unseen

    def _render(self, row: Mapping[str, Any]) -> RenderedRow:
        values = {k: ("" if v is None else v) for k, v in row.items()}
        doc_id = str(row[self.id_column])

        def fill(template: str) -> str:
            try:
                return template.format_map(values)
            except KeyError as error:
                raise ConfigError(f"source {self.name!r}: column {error.args[0]} does not "
                                  f"exist in {self.table or 'the query'}") from error
            except (ValueError, IndexError, AttributeError) as error:
                raise ConfigError(f"source {self.name!r}: template {template!r} cannot be "
                                  f"filled: {error}") from error

        label = self.table or self.name
        return RenderedRow(
            doc_id=doc_id,
            text=fill(self.text_template),
            title=fill(self.title_template) if self.title_template else f"{label} {doc_id}",
            url=fill(self.url_template) if self.url_template else None,
            modified=_modified(row[self.cursor_column]) if self.cursor_column else None,
            principals=self._principals(doc_id, row),
        )

    def _principals(self, doc_id: str, row: Mapping[str, Any]) -> tuple[str, ...]:
        if not self.principals_column:
            return tuple(self.config.principals_for(doc_id))
        value = row[self.principals_column]
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise SourceError(f"source {self.name!r}: row {doc_id} has unreadable "
                                  f"principals in {self.principals_column}",
                                  repr(error)) from error
        if isinstance(value, str):
            value = value.split(",")
        return tuple(sorted({str(p).strip() for p in value or () if str(p).strip()}))

    def _change(self, rendered: RenderedRow, fingerprint: str | None,
                known: KnownDocument | None) -> Change | None:
        doc_id, version, readers = rendered.doc_id, rendered.version, rendered.principals
        if known is None or known.quarantined or known.version != version:
            kind = ChangeKind.MODIFIED if known and not known.quarantined else ChangeKind.ADDED
            self._page[doc_id] = rendered
            return Change(doc_id, kind, version, fingerprint, readers)
        if sorted(known.principals) != list(readers):
            return Change(doc_id, ChangeKind.PERMISSIONS, version, fingerprint, readers)
        if fingerprint is not None and known.fingerprint != fingerprint:
            return Change(doc_id, ChangeKind.TOUCHED, version, fingerprint, readers)
        return None

    def fetch(self, change: Change) -> SourceDocument:
        rendered = self._page.pop(change.doc_id, None) or self._fetch_row(change.doc_id)
        content = rendered.text.encode()
        if len(content) > self.config.max_bytes:
            raise DocumentRejected(
                "fetch", f"row too large: {len(content) / 1e6:.1f} MB is over the "
                         f"{self.config.max_bytes / 1e6:.1f} MB limit")
        return SourceDocument(
            source=self.name,
            doc_id=change.doc_id,
            title=rendered.title,
            url=rendered.url,
            mime_type=self.mime_type,
            content=content,
            modified=rendered.modified,
            version=rendered.version,
            principals=list(rendered.principals),
            metadata={"id": change.doc_id, **({"table": self.table} if self.table else {})},
        )

    def _fetch_row(self, doc_id: str) -> RenderedRow:
        """One row by id, for a change fetched outside the page it was listed on."""
        statement = self._select(self.columns, f"src.{self._quote(self.id_column)} = :id")
        connection, result = self._open(statement, {"id": doc_id})
        try:
            with connection:
                row = result.mappings().first()
        except SQLAlchemyError as error:
            raise self._explain(error) from error
        if row is None or (self.soft_delete_column and _is_deleted(row[self.soft_delete_column])):
            raise DocumentRejected("fetch", "row disappeared during the sync")
        return self._render(row)

