"""A zero-downtime reindex: every source re-read into a new versioned collection, then the alias
the queries address switched to it in one call."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import weaviate
from sqlalchemy import delete, select, update
from weaviate.classes.data import DataObject
from weaviate.classes.query import Filter
from weaviate.exceptions import WeaviateBaseError

from headwater.config import load_sources
from headwater.errors import HeadwaterError
from headwater.settings import Settings
from headwater.state import (
    Base,
    DocumentRow,
    QuarantineRow,
    SourceBusy,
    SourceRow,
    StateStore,
    SubjectRow,
)
from tasks import ingest
from tasks.index import (
    alias_target,
    connect_index,
    count_chunks,
    create_collection,
    index_versions,
    versioned_name,
)

REINDEX_ACTOR = "system:reindex"
# What a source's sync state is made of: put back as it was when a reindex is abandoned.
_SOURCE_TABLES: tuple[type[Base], ...] = (DocumentRow, QuarantineRow, SubjectRow)
_SOURCE_STATE = ("cursor", "processing", "last_success_at")
_COPY_DOCS = 50  # stale documents whose chunks are copied per query
# A reindex renews every lock after each source; one source may take hours to re-read.
LOCK_TTL = timedelta(hours=6)


class ReindexFailed(HeadwaterError):
    """The new collection could not be built or checked; queries still use the old one."""


@dataclass
class SourceSnapshot:
    """One source's sync state in the store, as rows."""

    state: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]]


@dataclass
class ReindexPlan:
    """Where a reindex reads from and writes to, and what it holds meanwhile."""

    alias: str
    current: str | None  # the collection queries use now; None before the first sync
    aliased: bool  # False: `current` is a collection made before aliases, named like the alias
    target: str  # the new versioned collection
    sources: list[str]
    locks: dict[str, str]  # source -> lock owner
    snapshots: dict[str, SourceSnapshot] = field(default_factory=dict, repr=False)
    chunks: dict[str, int] = field(default_factory=dict)  # per source, in the new collection


def take_locks(store: StateStore, sources: dict[str, str]) -> dict[str, str]:
    """Every source's sync lock (source -> type), or none: scheduled syncs are skipped while a
    reindex holds them, and resume incrementally after."""
    owners: dict[str, str] = {}
    try:
        for name, type_ in sources.items():
            store.ensure_source(name, type_)
            owners[name] = store.acquire_lock(name, LOCK_TTL)
    except SourceBusy as busy:
        release_locks(store, owners)
        raise ReindexFailed(f"a sync is running ({busy}); run the reindex again once it ended",
                            str(busy)) from busy
    return owners


def release_locks(store: StateStore, owners: dict[str, str]) -> None:
    for name, owner in owners.items():
        store.release_lock(name, owner)


def snapshot_source(store: StateStore, source: str) -> SourceSnapshot:
    with store.session() as s:
        row = s.get(SourceRow, source)
        state = {k: getattr(row, k) for k in _SOURCE_STATE}
        rows = {table.__tablename__: [
            {c.key: getattr(r, c.key) for c in table.__table__.columns}
            for r in s.execute(select(table).where(table.source == source)).scalars()]
            for table in _SOURCE_TABLES}
    return SourceSnapshot(state, rows)


def restore_source(store: StateStore, source: str, snapshot: SourceSnapshot) -> None:
    """Put a source's sync state back, in one transaction: the store again describes the
    collection the alias still points at."""
    with store.session() as s:
        for table in _SOURCE_TABLES:
            s.execute(delete(table).where(table.source == source))
            rows = snapshot.rows[table.__tablename__]
            if rows:
                s.execute(table.__table__.insert(), rows)
        s.execute(update(SourceRow).where(SourceRow.name == source).values(**snapshot.state))


def plan_reindex(settings: Settings, client: weaviate.WeaviateClient,
                 store: StateStore) -> ReindexPlan:
    """Lock every source, remember its state, and create the next versioned collection."""
    sources = load_sources(settings.config)
    alias = settings.collection
    locks = take_locks(store, {name: s.type for name, s in sources.items()})
    try:
        current = alias_target(client, alias)
        aliased = current is not None
        if not aliased and client.collections.exists(alias):
            current = alias  # an index made before aliases: the first reindex migrates it
        version = max(index_versions(client, alias), default=0) + 1
        plan = ReindexPlan(alias, current, aliased, versioned_name(alias, version),
                           list(sources), locks)
        plan.snapshots = {name: snapshot_source(store, name) for name in sources}
        create_collection(client, plan.target)
    except BaseException:
        release_locks(store, locks)
        raise
    return plan


def open_pass(settings: Settings, source: str, collection: str, lock_owner: str,
              flow_run_id: str | None = None) -> ingest.SyncContext:
    """A full sync of one source into the new collection, under the reindex's lock."""
    ctx = ingest.open_sync(settings, source, True, flow_run_id, collection=collection,
                           lock_owner=lock_owner)
    ctx.reread = f"full re-read into {collection} for a reindex"
    return ctx


def carry_stale(client: weaviate.WeaviateClient, store: StateStore, plan: ReindexPlan,
                source: str) -> int:
    """Documents whose newest version sits in quarantine keep serving their last good one:
    copy its chunks, vectors included, from the current collection."""
    with store.session() as s:
        stale = list(s.execute(select(DocumentRow.doc_id).where(
            DocumentRow.source == source, DocumentRow.status == "stale")).scalars())
    if not stale or plan.current is None:
        return 0
    old, new = client.collections.use(plan.current), client.collections.use(plan.target)
    copied = 0
    try:
        for start in range(0, len(stale), _COPY_DOCS):
            where = (Filter.by_property("source").equal(source)
                     & Filter.by_property("doc_id").contains_any(stale[start:start + _COPY_DOCS]))
            found = old.query.fetch_objects(filters=where, include_vector=True, limit=10_000)
            objects = [DataObject(properties=o.properties, uuid=o.uuid,
                                  vector=o.vector["default"]) for o in found.objects]
            if objects:
                errors = new.data.insert_many(objects).errors
                if errors:
                    raise ReindexFailed(f"{len(errors)} chunks of quarantined documents of "
                                        f"{source!r} could not be copied", repr(errors)[:2000])
                copied += len(objects)
    except WeaviateBaseError as error:
        raise ReindexFailed(f"chunks of quarantined documents of {source!r} could not be "
                            "copied to the new collection", repr(error)) from error
    return copied


def verify_source(client: weaviate.WeaviateClient, store: StateStore, plan: ReindexPlan,
                  source: str, summary: dict[str, Any]) -> int:
    """The new collection holds exactly the chunks the state store counts for the source (less
    those withheld for erased subjects, which the store counts as gaps)."""
    with store.session() as s:
        counted = sum(s.execute(select(DocumentRow.chunk_count).where(
            DocumentRow.source == source)).scalars())
    expected = counted - int(summary.get("suppressed", 0))
    found = count_chunks(client, plan.target, source)
    if found != expected:
        raise ReindexFailed(f"the new collection {plan.target} holds {found} chunks of "
                            f"{source!r}, the state store counts {expected}; nothing was "
                            "switched")
    plan.chunks[source] = found
    return found


def switch_alias(client: weaviate.WeaviateClient, plan: ReindexPlan) -> None:
    """Point the alias at the new collection: one call, between two queries.

    Migrating an index made before aliases is the exception: its collection holds the name the
    alias takes, so it is deleted first, and queries fail for the moment until the alias exists
    (the next call).
    """
    try:
        if plan.aliased:
            if not client.alias.update(alias_name=plan.alias, new_target_collection=plan.target):
                raise ReindexFailed(f"the alias {plan.alias} vanished during the reindex")
            return
        if plan.current is not None:
            client.collections.delete(plan.current)
        client.alias.create(alias_name=plan.alias, target_collection=plan.target)
    except WeaviateBaseError as error:
        raise ReindexFailed(f"the alias {plan.alias} could not be switched to {plan.target}",
                            repr(error)) from error


def retire_versions(client: weaviate.WeaviateClient, plan: ReindexPlan, keep: int) -> list[str]:
    """Delete replaced versions, all but the `keep` newest; returns the ones deleted."""
    older = [name for version, name in sorted(index_versions(client, plan.alias).items(),
                                               reverse=True) if name != plan.target]
    for name in older[keep:]:
        client.collections.delete(name)
    return older[keep:]


def abandon(client: weaviate.WeaviateClient, store: StateStore, plan: ReindexPlan) -> str:
    """Undo a failed reindex: every source's state back as it was, the new collection gone;
    returns what became of the new collection, in words."""
    old_gone = plan.current is not None and not client.collections.exists(plan.current)
    if alias_target(client, plan.alias) == plan.target or old_gone:
        # The switch went (part of the) way: the store describes the new collection, keep both.
        return (f"{plan.target} was kept: the alias {plan.alias} may depend on it; check it "
                "with `headwater status --deep`")
    for source, snapshot in plan.snapshots.items():
        restore_source(store, source, snapshot)
    client.collections.delete(plan.target)
    return f"{plan.target} was deleted; {plan.alias} still points at {plan.current}"


# -- the steps of the `reindex` flow ----------------------------------------------------------


def begin_reindex(settings: Settings, reason: str, actor: str,
                  run_id: str | None = None) -> ReindexPlan:
    store = StateStore(settings.resolved_state_db_url)
    try:
        with connect_index(settings) as client:
            return plan_reindex(settings, client, store)
    except HeadwaterError as error:
        store.append_audit(actor, "admin.reindex", f"index:{settings.collection}", "refused",
                           run_id, {"reason": reason, "error": error.user_message})
        raise


def check_source(settings: Settings, plan: ReindexPlan, source: str,
                 summary: dict[str, Any]) -> int:
    """After a source's pass: carry its quarantined documents over, then count."""
    store = StateStore(settings.resolved_state_db_url)
    for name, owner in plan.locks.items():
        store.renew_lock(name, owner, LOCK_TTL)
    with connect_index(settings) as client:
        carry_stale(client, store, plan, source)
        return verify_source(client, store, plan, source, summary)


def switch_index(settings: Settings, plan: ReindexPlan) -> None:
    with connect_index(settings) as client:
        switch_alias(client, plan)


def finish_reindex(settings: Settings, plan: ReindexPlan, reason: str, actor: str,
                   keep_old: bool, run_id: str | None = None) -> dict[str, Any]:
    """After the switch: retire replaced versions, free the sources, and say so in the audit."""
    store = StateStore(settings.resolved_state_db_url)
    keep = max(settings.reindex_keep_versions, 1 if keep_old else 0)
    result: dict[str, Any] = {"alias": plan.alias, "from": plan.current, "to": plan.target,
                              "chunks": plan.chunks, "reason": reason}
    try:
        with connect_index(settings) as client:
            result["deleted"] = retire_versions(client, plan, keep)
    except (HeadwaterError, WeaviateBaseError) as error:
        # The switch is done and stays: an old version left behind is only wasted space.
        result["deleted"], result["message"] = [], f"old versions not deleted: {error!r}"
    finally:
        release_locks(store, plan.locks)
    store.append_audit(actor, "admin.reindex", f"index:{plan.alias}", "switched", run_id,
                       result)
    return result


def abandon_reindex(settings: Settings, plan: ReindexPlan, reason: str, actor: str,
                    error: str, run_id: str | None = None) -> str:
    store = StateStore(settings.resolved_state_db_url)
    try:
        with connect_index(settings) as client:
            fate = abandon(client, store, plan)
    finally:
        release_locks(store, plan.locks)
    store.append_audit(actor, "admin.reindex", f"index:{plan.alias}", "failed", run_id, {
        "reason": reason, "from": plan.current, "to": plan.target, "error": error,
        "new_collection": fate})
    return fate
