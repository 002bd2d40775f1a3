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


@pytest.fixture(params=["folder", "s3"])
def source(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> FolderFixture | BucketFixture:
    if request.param == "folder":
        return FolderFixture(tmp_path)
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
