"""The folder connector: globs, links, change kinds and deletions by difference."""

from __future__ import annotations

import os
from pathlib import Path

from connectors.base import ChangeKind
from connectors.filesystem import FolderConnector
from headwater.config import SourceConfig
from headwater.state import KnownDocument


def _connector(root: Path, **params: object) -> FolderConnector:
    return FolderConnector(SourceConfig(name="docs", type="folder",
                                        params={"root": str(root), **params},
                                        principals={"": ["group:staff"]}))


def _changes(connector: FolderConnector, known: dict | None = None) -> dict[str, ChangeKind]:
    return {c.doc_id: c.kind for page in connector.list_changes(None, known or {})
            for c in page.changes}


def test_include_and_exclude_globs_select_files(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("a")
    (tmp_path / "b.tmp").write_text("b")
    (tmp_path / ".hidden").write_text("h")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("c")
    connector = _connector(tmp_path, include=["**/*.md", "*.md"])
    assert sorted(_changes(connector)) == ["a.md", "sub/c.md"]


def test_links_out_of_the_root_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("payroll")
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.txt").write_text("fine")
    os.symlink(outside / "secret.txt", root / "leak.txt")
    os.symlink(outside, root / "leakdir")
    os.symlink(root / "ok.txt", root / "alias.txt")
    assert sorted(_changes(_connector(root))) == ["alias.txt", "ok.txt"]


def test_changes_are_classified_against_what_the_index_holds(tmp_path: Path) -> None:
    connector = _connector(tmp_path)
    for name in ("same.txt", "edited.txt", "touched.txt", "new.txt"):
        (tmp_path / name).write_text(name)
    first = {c.doc_id: c for page in connector.list_changes(None, {}) for c in page.changes}
    known = {
        d: KnownDocument(d, c.version, c.fingerprint, 1, list(c.principals))
        for d, c in first.items() if d != "new.txt"
    }
    known["gone.txt"] = KnownDocument("gone.txt", "x", "1:1", 1, ["group:staff"])
    (tmp_path / "edited.txt").write_text("edited, longer")
    os.utime(tmp_path / "touched.txt", (1, 1))
    assert _changes(connector, known) == {
        "edited.txt": ChangeKind.MODIFIED,
        "touched.txt": ChangeKind.TOUCHED,
        "new.txt": ChangeKind.ADDED,
        "gone.txt": ChangeKind.DELETED,
    }


def test_a_missing_root_fails_the_connection_test(tmp_path: Path) -> None:
    check = _connector(tmp_path / "nope").test_connection()
    assert not check.ok and "does not exist" in check.message
