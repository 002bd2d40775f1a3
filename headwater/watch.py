"""Watching folder sources (watchdog): bursts of file changes become one change notification."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from connectors.filesystem import FolderConnector
from headwater.config import ConfigError, SourceConfig
from headwater.settings import Settings
from headwater.state import StateStore
from tasks.changes import ChangeNotice, accept_changes

log = logging.getLogger(__name__)

# Events that say nothing about content or presence.
IGNORED = {"opened", "closed_no_write"}


class Gathered:
    """One source's changed paths since its last notice: a notice is due once the folder has
    been quiet for `quiet_s`, or has been busy for `max_wait_s` (a folder that never rests
    is still indexed)."""

    def __init__(self, source: str, quiet_s: float, max_wait_s: float) -> None:
        self.source, self.quiet_s, self.max_wait_s = source, quiet_s, max_wait_s
        self.paths: set[str] = set()
        self.list_changed = False
        self.first = self.last = 0.0

    def add(self, rel: str | None, now: float) -> None:
        """A changed file by its path under the root; None: the folder's list changed in a way
        files do not tell (a folder moved out or removed)."""
        if not (self.paths or self.list_changed):
            self.first = now
        self.last = now
        if rel is None:
            self.list_changed = True
        else:
            self.paths.add(rel)

    def due(self, now: float) -> ChangeNotice | None:
        if not (self.paths or self.list_changed):
            return None
        if now - self.last < self.quiet_s and now - self.first < self.max_wait_s:
            return None
        notice = ChangeNotice(self.source, tuple(sorted(self.paths)), self.list_changed)
        self.paths, self.list_changed = set(), False
        return notice


class _FolderEvents(FileSystemEventHandler):
    def __init__(self, connector: FolderConnector, watcher: FolderWatcher) -> None:
        self.connector, self.watcher = connector, watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in IGNORED:
            return
        if event.is_directory:
            # A folder created or moved in is announced file by file (watchdog walks it); one
            # removed or moved away only as itself, so its files are found by a listing.
            if event.event_type in ("deleted", "moved"):
                self.watcher.changed(self.connector.name, None)
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(str(raw))
            if not path.is_relative_to(self.connector.root):
                continue
            rel = path.relative_to(self.connector.root).as_posix()
            # The source's include/exclude globs: an editor's swap file is no document.
            if self.connector.wants(rel):
                self.watcher.changed(self.connector.name, rel)


class FolderWatcher:
    """A watchdog Observer on the roots of folder sources; each source's bursts of changes are
    delivered as one notice once it is quiet."""

    def __init__(self, sources: Iterable[SourceConfig],
                 deliver: Callable[[ChangeNotice], object],
                 quiet_s: float = 1.0, max_wait_s: float = 30.0) -> None:
        self.deliver = deliver
        self.connectors = {s.name: FolderConnector(s) for s in sources}
        self.gathered = {name: Gathered(name, quiet_s, max_wait_s) for name in self.connectors}
        self.tick_s = min(quiet_s / 4, 0.25)
        self._lock = threading.Condition()
        self._stopped = threading.Event()
        self._observer = Observer()
        for connector in self.connectors.values():
            if not connector.root.is_dir():
                raise ConfigError(f"source {connector.name!r}: folder {connector.root} does "
                                  "not exist")
            self._observer.schedule(_FolderEvents(connector, self), str(connector.root),
                                    recursive=True)
        self._flusher = threading.Thread(target=self._flush, name="headwater-watch",
                                         daemon=True)

    def start(self) -> FolderWatcher:
        self._observer.start()
        self._flusher.start()
        return self

    def changed(self, source: str, rel: str | None) -> None:
        with self._lock:
            self.gathered[source].add(rel, time.monotonic())

    def _flush(self) -> None:
        while not self._stopped.wait(self.tick_s):
            self._deliver_due(time.monotonic())
        self._deliver_due(float("inf"))  # what was gathered before stop() is not lost

    def _deliver_due(self, now: float) -> None:
        with self._lock:
            notices = [n for g in self.gathered.values() if (n := g.due(now)) is not None]
        for notice in notices:
            try:
                self.deliver(notice)
            except Exception:  # the state store is down: keep the paths for the next tick
                log.exception("could not record changes of source %r", notice.source)
                with self._lock:
                    gathered = self.gathered[notice.source]
                    for rel in notice.doc_ids:
                        gathered.add(rel, time.monotonic())
                    if notice.list_changed:
                        gathered.add(None, time.monotonic())

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=10)
        self._stopped.set()
        self._flusher.join(timeout=30)


def folder_sources(sources: Mapping[str, SourceConfig],
                   only: str | None = None) -> list[SourceConfig]:
    """The folder sources to watch: all of them, or the one named."""
    if only is not None:
        if only not in sources:
            raise ConfigError(f"no source named {only!r}; known: {sorted(sources)}")
        if sources[only].type != "folder":
            raise ConfigError(f"source {only!r} is a {sources[only].type} source; only folder "
                              "sources can be watched (others send notifications)")
        return [sources[only]]
    found = [s for s in sources.values() if s.type == "folder"]
    if not found:
        raise ConfigError("no folder source to watch in the sources file")
    return found


def watch_folders(settings: Settings, sources: Iterable[SourceConfig],
                  quiet_s: float = 1.0) -> FolderWatcher:
    """Start watching; every burst is recorded as pending and announced, as a webhook is."""
    store = StateStore(settings.resolved_state_db_url)
    return FolderWatcher(sources, lambda notice: accept_changes(store, notice),
                         quiet_s).start()
