"""A folder source: files under a root, changes by size+mtime confirmed by content hash."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

from connectors.base import (
    Change,
    ChangeKind,
    ChangePage,
    ConnectionCheck,
    Cursor,
    listing_pages,
    named_page,
)
from headwater.config import SourceConfig
from headwater.records import SourceDocument
from headwater.state import KnownDocument
from tasks.parse import DocumentRejected, mime_for


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderConnector:
    """Reads a local folder. Follows no link out of the root."""

    def __init__(self, config: SourceConfig) -> None:
        self.name = config.name
        self.config = config
        root = Path(config.params["root"]).expanduser()
        self.root = (root if root.is_absolute() else config.base_dir / root).resolve()
        self.include: list[str] = list(config.params.get("include", ["**"]))
        self.exclude: list[str] = list(config.params.get("exclude", ["**/.*", ".*"]))
        self.page_size = config.batch_size

    def test_connection(self) -> ConnectionCheck:
        if not self.root.is_dir():
            return ConnectionCheck(False, f"folder {self.root} does not exist")
        if not os.access(self.root, os.R_OK | os.X_OK):
            return ConnectionCheck(False, f"folder {self.root} is not readable")
        return ConnectionCheck(True, f"folder {self.root} is readable")

    def wants(self, rel: str) -> bool:
        """Whether a path under the root is a document of this source (include/exclude)."""
        def matches(pattern: str) -> bool:
            # "**/x" should also match "x" at the root, as in most glob dialects.
            return fnmatch(rel, pattern) or (pattern.startswith("**/") and fnmatch(rel,
                                                                                  pattern[3:]))

        return any(map(matches, self.include)) and not any(map(matches, self.exclude))

    def _files(self) -> Iterator[tuple[str, Path]]:
        for directory, dirs, files in os.walk(self.root, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                path = Path(directory) / name
                rel = path.relative_to(self.root).as_posix()
                if self._indexable(rel, path):
                    yield rel, path

    def _indexable(self, rel: str, path: Path) -> bool:
        if not self.wants(rel):
            return False
        if path.is_symlink():
            target = path.resolve()
            return target.is_relative_to(self.root) and target.is_file()
        return path.is_file()

    def _named(self, rel: str) -> Path | None:
        """The file a document id names, if a listing would include it."""
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or {"..", "."} & set(parts) or (
                "/".join(parts) != rel):
            return None  # not an id a listing makes: never look outside the root
        path = self.root.joinpath(*parts)
        # A listing does not descend into linked folders, so neither does a notification.
        if Path(os.path.realpath(path.parent)) != path.parent:
            return None
        return path if self._indexable(rel, path) else None

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        if not self.root.is_dir():
            from headwater.errors import SourceError

            raise SourceError(f"folder {self.root} does not exist")
        listing = ((rel, self._compare(rel, path, known.get(rel))) for rel, path in self._files())
        # A folder cannot report deletions: whatever the index holds that is gone was deleted.
        yield from listing_pages(listing, known, self.page_size)

    def changes_for(self, doc_ids: Iterable[str],
                    known: Mapping[str, KnownDocument]) -> ChangePage:
        def look(rel: str) -> tuple[bool, Change | None]:
            path = self._named(rel)
            return (False, None) if path is None else (True, self._compare(rel, path,
                                                                           known.get(rel)))

        return named_page(doc_ids, known, look)

    def _compare(self, rel: str, path: Path, known: KnownDocument | None) -> Change | None:
        stat = path.stat()
        fingerprint = f"{stat.st_size}:{stat.st_mtime_ns}"
        principals = tuple(self.config.principals_for(rel))
        if stat.st_size > self.config.max_bytes:
            # Too big to read: versioned by size+mtime, rejected when fetched.
            version = f"stat:{fingerprint}"
            indexed = known is not None and not known.quarantined
            return Change(rel, ChangeKind.MODIFIED if indexed else ChangeKind.ADDED, version,
                          fingerprint, principals)
        if known is None or known.quarantined:
            # Quarantined documents are retried on every run until they index.
            return Change(rel, ChangeKind.ADDED, _file_hash(path), fingerprint, principals)
        same_readers = sorted(known.principals) == list(principals)
        if known.fingerprint == fingerprint:
            if same_readers:
                return None
            return Change(rel, ChangeKind.PERMISSIONS, known.version, fingerprint, principals)
        version = _file_hash(path)
        if version == known.version:
            kind = ChangeKind.TOUCHED if same_readers else ChangeKind.PERMISSIONS
            return Change(rel, kind, version, fingerprint, principals)
        return Change(rel, ChangeKind.MODIFIED, version, fingerprint, principals)

    def fetch(self, change: Change) -> SourceDocument:
        path = self.root / change.doc_id
        try:
            stat = path.stat()
            if stat.st_size > self.config.max_bytes:
                raise DocumentRejected(
                    "fetch",
                    f"file too large: {stat.st_size / 1e6:.1f} MB is over the "
                    f"{self.config.max_bytes / 1e6:.1f} MB limit",
                )
            content = path.read_bytes()
        except FileNotFoundError as error:
            raise DocumentRejected("fetch", "file disappeared during the sync") from error
        except PermissionError as error:
            raise DocumentRejected("fetch", f"file is not readable: {error}") from error
        return SourceDocument(
            source=self.name,
            doc_id=change.doc_id,
            title=path.stem.replace("_", " ").replace("-", " ").strip() or path.name,
            url=path.as_uri(),
            mime_type=mime_for(path.name),
            content=content,
            modified=datetime.fromtimestamp(stat.st_mtime, UTC),
            version=change.version or "",
            principals=list(change.principals),
            metadata={"path": change.doc_id, "size": str(stat.st_size)},
        )
