"""The connector contract: every source connector passes these same specifications.

A source fixture gives: `config(**overrides)`, `put(key, body)` (a key under "hr/" is readable
by group:hr only, anything else by group:staff), `remove(key)`, `doc_id(key)`,
`restrict(key, principals) -> SourceConfig` (the readers of one document change in the source, or
in the configuration for sources whose readers are configured), `mime(key)` (what `fetch` reports)
and `broken()` (a config naming something that does not exist).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import boto3
import pytest

from connectors import open_connector
from connectors.base import ChangeKind, Connector
from headwater.config import SourceConfig
from headwater.state import KnownDocument
from tasks.parse import mime_for

READERS = {"principals": {"": ["group:staff"], "hr/": ["group:hr"]}}


class FolderFixture:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "folder"
        self.root.mkdir()

    def config(self, **overrides: object) -> SourceConfig:
        return SourceConfig(**{"name": "contract", "type": "folder",
                               "params": {"root": str(self.root)}, **READERS, **overrides})

    def put(self, key: str, body: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)

    def remove(self, key: str) -> None:
        (self.root / key).unlink()

    def doc_id(self, key: str) -> str:
        return key

    def restrict(self, key: str, principals: list[str]) -> SourceConfig:
        return self.config(principals={**READERS["principals"], key: principals})

    def mime(self, key: str) -> str:
        return mime_for(key)

    def broken(self) -> SourceConfig:
        return SourceConfig(name="contract", type="folder",
                            params={"root": str(self.root / "missing")})


class BucketFixture:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.bucket = f"contract-{uuid.uuid4().hex[:8]}"
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="test", aws_secret_access_key="test")
        self.s3.create_bucket(Bucket=self.bucket)

    def params(self, bucket: str) -> dict[str, object]:
        return {"bucket": bucket, "prefix": "docs/", "endpoint_url": self.endpoint,
                "access_key_id": {"env": "CONTRACT_S3_KEY"},
                "secret_access_key": {"env": "CONTRACT_S3_SECRET"}}

    def config(self, **overrides: object) -> SourceConfig:
        return SourceConfig(**{"name": "contract", "type": "s3",
                               "params": self.params(self.bucket), **READERS, **overrides})

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=f"docs/{key}", Body=body)

    def remove(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=f"docs/{key}")

    def doc_id(self, key: str) -> str:
        return f"docs/{key}"

    def restrict(self, key: str, principals: list[str]) -> SourceConfig:
        return self.config(principals={**READERS["principals"], key: principals})

    def mime(self, key: str) -> str:
        return mime_for(key)

    def broken(self) -> SourceConfig:
        return SourceConfig(name="contract", type="s3", params=self.params("no-such-bucket"))


class DatabaseFixture:
    """A table in a SQLite file, or in a schema of its own in the session's PostgreSQL."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        self.url, self.sql = url, text
        self.table = f"{schema}.documents" if schema else "documents"
        self.engine = create_engine(url, poolclass=NullPool)  # no connection outlives a write
        self.clock = datetime(2024, 1, 1)
        with self.engine.begin() as db:
            if schema:
                db.execute(text(f"CREATE SCHEMA {schema}"))
            db.execute(text(f"CREATE TABLE {self.table} (doc_key VARCHAR(200) PRIMARY KEY, "
                            "body TEXT NOT NULL, updated_at TIMESTAMP NOT NULL)"))

    def params(self, table: str) -> dict[str, object]:
        return {"url": self.url, "table": table, "id_column": "doc_key",
                "text_template": "{body}", "cursor_column": "updated_at"}

    def config(self, **overrides: object) -> SourceConfig:
        return SourceConfig(**{"name": "contract", "type": "database",
                               "params": self.params(self.table), **READERS, **overrides})

    def put(self, key: str, body: bytes) -> None:
        self.clock += timedelta(seconds=1)  # the row's updated_at moves on, as an app's would
        with self.engine.begin() as db:
            db.execute(self.sql(f"DELETE FROM {self.table} WHERE doc_key = :k"), {"k": key})
            db.execute(self.sql(f"INSERT INTO {self.table} VALUES (:k, :b, :t)"),
                       {"k": key, "b": body.decode(), "t": self.clock})

    def remove(self, key: str) -> None:
        with self.engine.begin() as db:
            db.execute(self.sql(f"DELETE FROM {self.table} WHERE doc_key = :k"), {"k": key})

    def doc_id(self, key: str) -> str:
        return key

    def restrict(self, key: str, principals: list[str]) -> SourceConfig:
        return self.config(principals={**READERS["principals"], key: principals})

    def mime(self, key: str) -> str:
        return "text/plain"

    def broken(self) -> SourceConfig:
        return SourceConfig(name="contract", type="database", params=self.params("no_such_table"))


class ConfluenceFixture:
    """Pages of one space in the Confluence emulator, titled by key; "hr/" pages are restricted
    to group hr, the space is read by group staff."""

    def __init__(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        from tests.emulators.confluence import ConfluenceEmulator

        self.emulator = ConfluenceEmulator("cloud", secret="contract-token")
        self.emulator.start()
        request.addfinalizer(self.emulator.stop)
        monkeypatch.setenv("CONTRACT_CONFLUENCE_TOKEN", "contract-token")
        self.emulator.add_space("DOCS", ["group:staff"])
        self.ids: dict[str, str] = {}

    def params(self, space: str) -> dict[str, object]:
        return {"url": f"{self.emulator.url}/wiki", "deployment": "cloud", "spaces": [space],
                "email": self.emulator.user, "api_token": {"env": "CONTRACT_CONFLUENCE_TOKEN"}}

    def config(self, **overrides: object) -> SourceConfig:
        return SourceConfig(**{"name": "contract", "type": "confluence",
                               "params": self.params("DOCS"), **overrides})

    def put(self, key: str, body: bytes) -> None:
        from html import escape

        storage = "".join(
            f"<h1>{escape(block[2:])}</h1>" if block.startswith("# ") else f"<p>{escape(block)}</p>"
            for block in body.decode().split("\n\n"))
        if key in self.ids:
            self.emulator.edit_page(self.ids[key], storage)
        else:
            self.ids[key] = self.emulator.add_page(
                "DOCS", key, storage, restricted_to_groups=["hr"] if key.startswith("hr/") else [])

    def remove(self, key: str) -> None:
        self.emulator.trash_page(self.ids[key])

    def doc_id(self, key: str) -> str:
        return f"DOCS/{self.ids[key]}"

    def restrict(self, key: str, principals: list[str]) -> SourceConfig:
        self.emulator.restrict_page(
            self.ids[key], groups=[p[6:] for p in principals if p.startswith("group:")],
            users=[p[5:] for p in principals if p.startswith("user:")])
        return self.config()

    def mime(self, key: str) -> str:
        return "text/markdown"

    def broken(self) -> SourceConfig:
        return SourceConfig(name="contract", type="confluence", params=self.params("NOSUCH"))


class SharePointFixture:
    """Files of the Documents library in the SharePoint emulator; the "hr" folder has broken
    inheritance with Read for the group hr only, everything else inherits the site's staff."""

    def __init__(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        from tests.emulators.sharepoint import SharePointEmulator

        self.emulator = SharePointEmulator(client_secret="contract-secret")
        self.emulator.start()
        request.addfinalizer(self.emulator.stop)
        monkeypatch.setenv("CONTRACT_SP_SECRET", "contract-secret")
        self.ids: dict[str, str] = {}

    def params(self, libraries: list[str]) -> dict[str, object]:
        return {"site_url": f"{self.emulator.url}{self.emulator.site}",
                "authority": self.emulator.url, "tenant": self.emulator.tenant,
                "client_id": self.emulator.client_id, "libraries": libraries,
                "client_secret": {"env": "CONTRACT_SP_SECRET"}}

    def config(self, **overrides: object) -> SourceConfig:
        return SourceConfig(**{"name": "contract", "type": "sharepoint",
                               "params": self.params(["Documents"]), **overrides})

    def put(self, key: str, body: bytes) -> None:
        try:
            self.emulator.edit_file(key, body, "Documents")
        except KeyError:
            self.ids[key] = self.emulator.add_file("Documents", key, body).unique_id
            if key.startswith("hr/"):
                self.emulator.set_readers("hr", ["group:hr"], "Documents")

    def remove(self, key: str) -> None:
        self.emulator.delete_file(key, "Documents")

    def doc_id(self, key: str) -> str:
        return self.ids[key]

    def restrict(self, key: str, principals: list[str]) -> SourceConfig:
        self.emulator.set_readers(key, principals, "Documents")
        return self.config()

    def mime(self, key: str) -> str:
        return mime_for(key)

    def broken(self) -> SourceConfig:
        return SourceConfig(name="contract", type="sharepoint",
                            params=self.params(["No Such Library"]))


@pytest.fixture(params=["folder", "s3", "sqlite", "postgres", "confluence",
                        "sharepoint"])
def source(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> FolderFixture | BucketFixture | DatabaseFixture:
    if request.param == "folder":
        return FolderFixture(tmp_path)
    if request.param == "confluence":
        return ConfluenceFixture(request, monkeypatch)
    if request.param == "sharepoint":
        return SharePointFixture(request, monkeypatch)
    if request.param == "sqlite":
        return DatabaseFixture(f"sqlite:///{tmp_path / 'contract.db'}")
    if request.param == "postgres":
        return DatabaseFixture(request.getfixturevalue("postgres_url"),
                               schema=f"contract_{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("CONTRACT_S3_KEY", "test")
    monkeypatch.setenv("CONTRACT_S3_SECRET", "test")
    return BucketFixture(request.getfixturevalue("s3_endpoint"))


def _listing(connector: Connector, known: dict[str, KnownDocument] | None = None) -> dict:
    return {c.doc_id: c for page in connector.list_changes(None, known or {})
            for c in page.changes}


def _known(changes: dict) -> dict[str, KnownDocument]:
    return {d: KnownDocument(d, c.version, c.fingerprint, 1, list(c.principals))
            for d, c in changes.items()}


def test_a_first_listing_reports_every_document_as_added_with_a_version(source) -> None:
    source.put("a.md", b"# A\n\nalpha")
    source.put("hr/pay.csv", b"role,band\nengineer,B3\n")
    changes = _listing(open_connector(source.config()))
    assert sorted(changes) == sorted([source.doc_id("a.md"), source.doc_id("hr/pay.csv")])
    assert all(c.kind is ChangeKind.ADDED and c.version for c in changes.values())
    assert changes[source.doc_id("hr/pay.csv")].principals == ("group:hr",)


def test_nothing_changed_means_no_changes(source) -> None:
    source.put("a.md", b"alpha")
    connector = open_connector(source.config())
    known = _known(_listing(connector))
    pages = list(connector.list_changes(None, known))
    assert [c for p in pages for c in p.changes] == []
    assert sum(p.unchanged for p in pages) == 1


def test_changes_and_deletions_are_reported(source) -> None:
    source.put("a.md", b"alpha")
    source.put("b.md", b"beta")
    connector = open_connector(source.config())
    known = _known(_listing(connector))
    source.put("a.md", b"alpha, edited")
    source.remove("b.md")
    source.put("c.md", b"gamma")
    kinds = {d: c.kind for d, c in _listing(connector, known).items()}
    assert kinds == {source.doc_id("a.md"): ChangeKind.MODIFIED,
                     source.doc_id("b.md"): ChangeKind.DELETED,
                     source.doc_id("c.md"): ChangeKind.ADDED}


def test_a_permission_change_is_reported_without_a_content_change(source) -> None:
    source.put("a.md", b"alpha")
    known = _known(_listing(open_connector(source.config())))
    stricter = source.restrict("a.md", ["group:hr"])
    (change,) = _listing(open_connector(stricter), known).values()
    assert change.kind is ChangeKind.PERMISSIONS and change.principals == ("group:hr",)


def test_fetch_returns_the_document_with_its_readers(source) -> None:
    source.put("hr/pay.md", b"# Pay\n\nBands are reviewed in March.")
    connector = open_connector(source.config())
    (change,) = _listing(connector).values()
    document = connector.fetch(change)
    assert document.content == b"# Pay\n\nBands are reviewed in March."
    assert document.mime_type == source.mime("hr/pay.md")
    assert document.principals == ["group:hr"] and document.source == "contract"
    assert document.version == change.version and document.modified is not None


def test_pages_are_bounded_and_cursors_are_json(source) -> None:
    for i in range(7):
        source.put(f"n{i}.txt", b"x")
    pages = list(open_connector(source.config(batch_size=3)).list_changes(None, {}))
    assert [len(p.changes) for p in pages] == [3, 3, 1]
    for page in pages:
        json.dumps(page.cursor)


def test_a_broken_source_fails_its_connection_test_in_one_line(source) -> None:
    check = open_connector(source.broken()).test_connection()
    assert not check.ok and "\n" not in check.message and "does not exist" in check.message
    assert open_connector(source.config()).test_connection().ok
