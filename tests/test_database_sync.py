"""A SQL table synced through `sync_source` into the real Weaviate, from PostgreSQL and SQLite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import jwt
import pytest
import yaml
from conftest import indexed_texts
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from connectors import open_connector
from connectors.base import ChangeKind
from connectors.database import DatabaseConnector, check_read_only_select
from flows.sync import sync_source
from headwater.api import create_app
from headwater.config import ConfigError, SourceConfig
from headwater.errors import SourceError, TransientError
from headwater.settings import Settings, get_settings
from headwater.state import KnownDocument, StateStore

HEADWATER = str(Path(sys.executable).parent / "headwater")
SECRET = "test-signing-secret-of-enough-length"
ARTICLES = ("CREATE TABLE articles (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT "
            "NULL, readers TEXT NOT NULL, deleted BOOLEAN NOT NULL DEFAULT FALSE, updated_at "
            "TIMESTAMP NOT NULL)")


class ArticlesTable:
    """An `articles` table of one test's own, its sources file, state DB and collection."""

    def __init__(self, url: str, tmp_path: Path, collection: str, client,
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.url, self.collection, self.client = url, collection, client
        self.engine: Engine = create_engine(url)
        with self.engine.begin() as db:
            db.execute(text(ARTICLES))
        self.clock = datetime(2024, 3, 1, 9, 0)
        self.config = tmp_path / "headwater.yaml"
        self.params: dict[str, object] = {
            "url": url, "table": "articles", "id_column": "id",
            "text_template": "{title}\n\n{body}", "title_template": "{title}",
            "url_template": "https://intranet.example/articles/{id}",
            "cursor_column": "updated_at", "soft_delete_column": "deleted",
            "principals_column": "readers"}
        self.configure()
        self.env = {"HEADWATER_CONFIG": str(self.config),
                    "HEADWATER_STATE_DB_URL": f"sqlite:///{tmp_path / 'state.db'}",
                    "HEADWATER_COLLECTION": collection}
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        self.store = StateStore(self.env["HEADWATER_STATE_DB_URL"])

    def configure(self, batch_size: int = 32, **params: object) -> None:
        self.params.update(params)
        self.config.write_text(yaml.safe_dump({"sources": [{
            "name": "articles", "type": "database", "batch_size": batch_size,
            "params": {k: v for k, v in self.params.items() if v is not None}}]}))

    def tick(self) -> datetime:
        self.clock += timedelta(minutes=1)
        return self.clock

    def run(self, sql: str, **values: object) -> None:
        with self.engine.begin() as db:
            db.execute(text(sql), values)

    def insert(self, id_: int, title: str, body: str, readers: str = "group:staff",
               at: datetime | None = None) -> None:
        self.run("INSERT INTO articles (id, title, body, readers, updated_at) "
                 "VALUES (:id, :title, :body, :readers, :at)",
                 id=id_, title=title, body=body, readers=readers, at=at or self.tick())

    def update(self, id_: int, **columns: object) -> None:
        assignments = ", ".join(f"{c} = :{c}" for c in columns)
        self.run(f"UPDATE articles SET {assignments}, updated_at = :at WHERE id = :id",
                 id=id_, at=self.tick(), **columns)

    def sync(self) -> dict:
        state = sync_source("articles", return_state=True)
        assert state.is_completed(), state
        return state.result()

    def index(self) -> dict[str, list[str]]:
        return indexed_texts(self.client, self.collection)


def _own_database(postgres_url: str) -> str:
    """A fresh database on the session's PostgreSQL server, for one test."""
    name = f"articles_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        db.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return make_url(postgres_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgres"])
def articles(request, tmp_path, collection, weaviate_client,
             monkeypatch) -> Iterator[ArticlesTable]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'articles.db'}"
    else:
        url = _own_database(request.getfixturevalue("postgres_url"))
    table = ArticlesTable(url, tmp_path, collection, weaviate_client, monkeypatch)
    yield table
    table.engine.dispose()
    get_settings.cache_clear()


@pytest.fixture
def pg_articles(tmp_path, collection, weaviate_client, monkeypatch,
                postgres_url) -> Iterator[ArticlesTable]:
    table = ArticlesTable(_own_database(postgres_url), tmp_path, collection, weaviate_client,
                          monkeypatch)
    yield table
    table.engine.dispose()
    get_settings.cache_clear()


def test_updated_new_soft_deleted_and_hard_deleted_rows_are_reflected_in_the_index(
    articles: ArticlesTable,
) -> None:
    articles.insert(1, "Pump maintenance", "Grease the BP-200 bearings every 500 hours.")
    articles.insert(2, "Annual leave", "Every employee has 25 days of annual leave.")
    articles.insert(3, "VPN", "Use the corporate VPN client on public networks.")
    articles.insert(4, "Budget", "The 2024 operations budget is 1.2 million euros.")
    first = articles.sync()
    assert (first["new"], first["deleted"]) == (4, 0)
    assert articles.index()["1"] == ["Pump maintenance\n\nGrease the BP-200 bearings every "
                                     "500 hours."]

    articles.update(1, body="Grease the BP-200 bearings every 250 hours.")
    articles.insert(5, "Expenses", "Submit expenses within 30 days.")
    articles.update(2, deleted=True)
    articles.run("DELETE FROM articles WHERE id = 3")
    articles.update(4, title="Budget")  # updated_at moves, the content does not
    second = articles.sync()
    assert (second["changed"], second["new"], second["deleted"]) == (1, 1, 1)
    assert second["unchanged"] == 1 and second["embedded"] == 2  # row 4 was only touched
    index = articles.index()
    assert index["1"] == ["Pump maintenance\n\nGrease the BP-200 bearings every 250 hours."]
    assert "5" in index and "2" not in index
    # A hard delete leaves no row to see: it is found when the keys are next reconciled.
    assert "3" in index

    articles.configure(reconcile_every_s=0)
    third = articles.sync()
    assert (third["deleted"], third["new"], third["changed"], third["embedded"]) == (1, 0, 0, 0)
    assert sorted(articles.index()) == ["1", "4", "5"]
    assert articles.store.cursor("articles")["id"] == 4


def _token(sub: str, groups: list[str]) -> str:
    claims = {"sub": sub, "groups": groups, "roles": ["user"], "aud": "headwater",
              "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_a_readers_change_is_a_permissions_change_and_moves_who_can_retrieve_the_row(
    pg_articles: ArticlesTable,
) -> None:
    pg_articles.insert(1, "Salary bands", "Engineers in band B3 earn between 61,000 and "
                       "75,000 euros.", readers='["group:hr"]')
    pg_articles.insert(2, "Annual leave", "Every employee has 25 days of annual leave.",
                       readers="group:hr, group:engineering")
    assert pg_articles.sync()["new"] == 2
    settings = Settings(collection=pg_articles.collection, jwt_secret=SECRET,
                        state_db_url=pg_articles.env["HEADWATER_STATE_DB_URL"])

    def bob_sees() -> set[str]:
        bob = {"Authorization": f"Bearer {_token('bob', ['engineering'])}"}
        with TestClient(create_app(settings)) as api:
            response = api.post("/v1/query", json={"question": "What do engineers earn in "
                                                   "salary band B3?", "top_k": 5}, headers=bob)
        assert response.status_code == 200, response.text
        return {s["doc_id"] for s in response.json()["sources"]}

    assert "1" not in bob_sees()
    pg_articles.update(1, readers='["group:hr", "group:engineering"]')
    summary = pg_articles.sync()
    assert (summary["permissions"], summary["changed"], summary["embedded"]) == (1, 0, 0)
    assert "1" in bob_sees()
    assert pg_articles.store.known_documents("articles")["1"].principals == [
        "group:engineering", "group:hr"]


def test_an_interrupted_sync_resumes_from_its_last_committed_page_and_ends_exact(
    articles: ArticlesTable, monkeypatch: pytest.MonkeyPatch,
) -> None:
    same_moment = articles.tick()  # every row ties on updated_at: only the id orders them
    for i in range(1, 10):
        articles.insert(i, f"Runbook {i}", f"Step {i}: restart pump station {i}.", at=same_moment)
    articles.configure(batch_size=2)
    listing = DatabaseConnector.list_changes

    def two_pages_then_outage(self, cursor, known):
        for number, page in enumerate(listing(self, cursor, known)):
            if number == 2:
                raise SourceError("source 'articles': the database went away")
            yield page

    monkeypatch.setattr(DatabaseConnector, "list_changes", two_pages_then_outage)
    failed = sync_source("articles", return_state=True)
    assert failed.is_failed()
    assert sorted(articles.index()) == ["1", "2", "3", "4"]
    assert articles.store.cursor("articles")["id"] == 4

    monkeypatch.setattr(DatabaseConnector, "list_changes", listing)
    resumed = articles.sync()
    assert (resumed["new"], resumed["changed"], resumed["deleted"]) == (5, 0, 0)
    objects = list(articles.client.collections.use(articles.collection).iterator())
    assert sorted(o.properties["doc_id"] for o in objects) == [str(i) for i in range(1, 10)]
    # The stored cursor is past the last row: a next listing has nothing to report.
    config = SourceConfig(name="articles", type="database", params=articles.params)
    known = articles.store.known_documents("articles")
    after = list(open_connector(config).list_changes(articles.store.cursor("articles"), known))
    assert [c for page in after for c in page.changes] == []


@pytest.fixture
def reader_role(pg_articles: ArticlesTable, postgres_url: str) -> Iterator[str]:
    """A role that must give its password, on a server whose fixture trusts everyone else."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as db:
        hba = Path(db.execute(text("SHOW hba_file")).scalar_one())
        db.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'right-password'"))
    pg_articles.run(f"GRANT SELECT ON articles TO {role}")
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    with admin.connect() as db:
        db.execute(text("SELECT pg_reload_conf()"))
    time.sleep(1)  # the server re-reads the file on a signal, not at once
    yield role
    hba.write_text(original)
    with admin.connect() as db:
        db.execute(text("SELECT pg_reload_conf()"))
    admin.dispose()


def test_a_wrong_password_fails_in_one_clear_line_and_leaves_the_index_untouched(
    pg_articles: ArticlesTable, reader_role: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg_articles.insert(1, "Pump maintenance", "Grease the BP-200 bearings every 500 hours.")
    pg_articles.insert(2, "Annual leave", "Every employee has 25 days of annual leave.")
    url = make_url(pg_articles.url).set(username=reader_role)
    pg_articles.configure(url=url.render_as_string(), password={"env": "ARTICLES_DB_PASSWORD"})
    monkeypatch.setenv("ARTICLES_DB_PASSWORD", "right-password")
    assert pg_articles.sync()["new"] == 2
    before = pg_articles.index()

    def sources_test() -> subprocess.CompletedProcess:
        return subprocess.run([HEADWATER, "sources", "test", "articles"], capture_output=True,
                              text=True, env=dict(os.environ), timeout=120)

    ok = sources_test()
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "articles: ok: table articles is readable (6 columns)"

    monkeypatch.setenv("ARTICLES_DB_PASSWORD", "wrong-password")
    expected = f"the database refused the credentials for user {reader_role}"
    broken = sources_test()
    assert broken.returncode == 1 and broken.stdout.strip() == f"articles: FAILED: {expected}"
    pg_articles.update(1, body="Grease the bearings every 250 hours.")
    state = sync_source("articles", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, SourceError)
    assert error.user_message == f"source 'articles': {expected}"
    assert "\n" not in error.user_message and "wrong-password" not in repr(error)
    assert pg_articles.index() == before


@pytest.mark.parametrize("query", [
    "DELETE FROM articles",
    "SELECT * FROM articles; DROP TABLE articles",
    "WITH gone AS (DELETE FROM articles RETURNING *) SELECT * FROM gone",
    "SELECT * INTO archive FROM articles",
    "SELECT * FROM articles FOR UPDATE",
    "PRAGMA writable_schema = ON",
    "/* SELECT */ UPDATE articles SET deleted = TRUE",
])
def test_a_query_that_is_not_one_read_only_select_is_refused(query: str) -> None:
    with pytest.raises(ConfigError, match=r"^params\.query must be"):
        check_read_only_select(query)


def test_a_select_or_with_query_is_accepted_with_quoted_words_and_comments() -> None:
    query = ("-- the published ones; drafts stay out\n"
             "WITH live AS (SELECT * FROM articles WHERE title <> 'DROP; DELETE')\n"
             "SELECT id, title FROM live;")
    assert check_read_only_select(query) == query.rstrip(";")


def test_a_sync_of_a_writing_query_is_refused_and_the_rows_stay(
    articles: ArticlesTable,
) -> None:
    articles.insert(1, "Pump maintenance", "Grease the BP-200 bearings every 500 hours.")
    articles.configure(table=None, query="DELETE FROM articles")
    state = sync_source("articles", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ConfigError)
    assert error.user_message == ("source 'articles': params.query must be a read-only SELECT "
                                  "(or WITH ... SELECT); it starts with DELETE")
    with articles.engine.connect() as db:
        assert db.execute(text("SELECT count(*) FROM articles")).scalar_one() == 1
    assert not articles.client.collections.exists(articles.collection)


def test_the_session_is_read_only_whatever_the_query_says(articles: ArticlesTable) -> None:
    articles.insert(1, "Pump maintenance", "Grease the BP-200 bearings every 500 hours.")
    articles.configure(table=None, query="SELECT a.*, length(a.body) AS size FROM articles a "
                                         "WHERE a.title <> 'Draft'")
    connector = open_connector(SourceConfig(name="articles", type="database",
                                            params=articles.params))
    assert connector.test_connection().ok
    with connector.engine.connect() as db, pytest.raises(DBAPIError, match=r"(?i)read.?only"):
        db.execute(text("INSERT INTO articles (id, title, body, readers, updated_at) "
                        "VALUES (2, 'x', 'y', 'public', '2024-01-01')"))
    assert articles.sync()["new"] == 1


@pytest.mark.parametrize(("params", "message"), [
    ({"table": "no_such_table"}, "table no_such_table does not exist"),
    ({"text_template": "{title}\n\n{summary}"}, "column summary does not exist in articles"),
    ({"soft_delete_column": "archived"}, "column archived does not exist in articles"),
])
def test_the_connection_test_names_the_first_problem_in_one_line(
    articles: ArticlesTable, params: dict, message: str,
) -> None:
    config = SourceConfig(name="articles", type="database", params={**articles.params, **params})
    check = open_connector(config).test_connection()
    assert (check.ok, check.message) == (False, message)


def test_a_change_fetched_outside_its_page_is_read_by_its_id(articles: ArticlesTable) -> None:
    articles.insert(7, "VPN", "Use the corporate VPN client on public networks.",
                    readers='["group:staff", "public"]')
    config = SourceConfig(name="articles", type="database", params=articles.params)
    (page,) = open_connector(config).list_changes(None, {})
    (change,) = page.changes
    assert change.kind is ChangeKind.ADDED and change.principals == ("group:staff", "public")
    document = open_connector(config).fetch(change)  # another connector: nothing rendered
    assert document.content == b"VPN\n\nUse the corporate VPN client on public networks."
    assert document.url == "https://intranet.example/articles/7"
    assert document.version == change.version and document.modified is not None


def test_without_a_cursor_column_every_listing_is_a_full_scan_with_deletion_by_difference(
    articles: ArticlesTable,
) -> None:
    articles.insert(1, "Pump maintenance", "Grease the BP-200 bearings every 500 hours.")
    articles.insert(2, "Annual leave", "Every employee has 25 days of annual leave.")
    articles.insert(3, "VPN", "Use the corporate VPN client on public networks.")
    params = {**articles.params, "cursor_column": None}
    connector = open_connector(SourceConfig(name="articles", type="database", params=params,
                                            batch_size=2))
    pages = list(connector.list_changes(None, {}))
    assert [len(p.changes) for p in pages] == [2, 1] and pages[-1].cursor is None
    known = {c.doc_id: KnownDocument(c.doc_id, c.version or "", c.fingerprint, 1,
                                     list(c.principals)) for p in pages for c in p.changes}
    articles.update(1, body="Grease the BP-200 bearings every 250 hours.")
    articles.update(2, deleted=True)
    articles.run("DELETE FROM articles WHERE id = 3")
    changes = {c.doc_id: c for p in connector.list_changes(None, known) for c in p.changes}
    assert {d: c.kind for d, c in changes.items()} == {
        "1": ChangeKind.MODIFIED, "2": ChangeKind.DELETED, "3": ChangeKind.DELETED}
    assert connector.fetch(changes["1"]).content.endswith(b"every 250 hours.")


def test_a_database_that_does_not_answer_is_named_by_its_address() -> None:
    from conftest import free_port

    port = free_port()
    config = SourceConfig(name="articles", type="database", params={
        "url": f"postgresql+psycopg://reader@127.0.0.1:{port}/articles", "table": "articles",
        "text_template": "{body}"})
    check = open_connector(config).test_connection()
    assert (check.ok, check.message) == (False, f"database at 127.0.0.1:{port} cannot be reached")


class _DriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(("said", "sqlstate", "kind", "message", "retried"), [
    ("could not serialize access", "40001", TransientError,
     "the database aborted the read (serialization failure)", True),
    ("deadlock detected", "40P01", TransientError, "the database aborted the read (deadlock)",
     True),
    ("sorry, too many clients already", "53300", TransientError,
     "the database has too many connections", True),
    ("database is locked", None, TransientError, "the database is locked by a writer", True),
    ('column "summary" does not exist', "42703", SourceError,
     "column summary does not exist in articles", False),
    ("no such table: articles", None, SourceError, "table articles does not exist", False),
    ('FATAL:  password authentication failed for user "reader"', "28P01", SourceError,
     "the database refused the credentials for user reader", False),
])
def test_each_database_error_is_one_line_and_retried_only_when_it_may_pass(
    said: str, sqlstate: str | None, kind: type, message: str, retried: bool,
) -> None:
    connector = DatabaseConnector(SourceConfig(name="articles", type="database", params={
        "url": "postgresql+psycopg://reader@db.internal/articles", "table": "articles",
        "text_template": "{body}"}))
    error = OperationalError("SELECT 1", {}, _DriverError(said, sqlstate))
    explained = connector._explain(error)
    assert type(explained) is kind and explained.user_message == f"source 'articles': {message}"
    assert (connector._classify(error) is not None) is retried
