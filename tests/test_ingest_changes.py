"""Event-triggered ingestion: signed change notifications in, exactly the named documents out."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import FolderSource, deployed_on_own_pool, deployment_runs, indexed_texts
from fastapi.testclient import TestClient

from headwater.api import create_app
from headwater.config import SourceConfig
from headwater.notifications import (
    CONFLUENCE_SIGNATURE_HEADER,
    S3_SECRET_HEADER,
    SIGNATURE_HEADER,
    NotificationRefused,
    parse_confluence,
    parse_s3,
    parse_sharepoint,
    sign,
)
from headwater.settings import PROJECT_ROOT, Settings, get_settings
from headwater.state import StateStore
from headwater.watch import FolderWatcher
from tasks.changes import EVENT_DOC_IDS, LIST_CHANGED, ChangeNotice, accept_changes, change_event

BIN = Path(sys.executable).parent
SECRET_ENV = "HEADWATER_TEST_NOTIFY_SECRET"
SECRET = "a-notification-secret-for-tests"
OTHER_ENV = "HEADWATER_TEST_NOTIFY_OTHER"


def _sources_file(path: Path, root: Path, *extra: dict) -> Path:
    """Sources that take notifications (`docs`, `wiki`), and one that takes none (`quiet`)."""
    path.write_text(yaml.safe_dump({"sources": [
        {"name": "docs", "type": "folder", "params": {"root": str(root)},
         "notifications": {"secret": {"env": SECRET_ENV}}},
        {"name": "wiki", "type": "folder", "params": {"root": str(root)},
         "notifications": {"secret": {"env": OTHER_ENV}}},
        {"name": "quiet", "type": "folder", "params": {"root": str(root)}},
        {"name": "teams", "type": "sharepoint",
         "params": {"site_url": "https://example.invalid/sites/t", "token": {"env": "NONE"}},
         "notifications": {"secret": {"env": SECRET_ENV}}},
        {"name": "kb", "type": "s3", "params": {"bucket": "kb-bucket"},
         "notifications": {"secret": {"env": SECRET_ENV}}},
        {"name": "space", "type": "confluence", "params": {"url": "https://example.invalid"},
         "notifications": {"secret": {"env": SECRET_ENV}}},
        *extra,
    ]}))
    return path


@pytest.fixture
def api(tmp_path, monkeypatch) -> tuple[TestClient, StateStore]:
    """The HTTP API (without its model: notifications need none) and its state store."""
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setenv(OTHER_ENV, "another-sources-secret")
    (tmp_path / "root").mkdir()
    settings = Settings(config=_sources_file(tmp_path / "headwater.yaml", tmp_path / "root"),
                        state_db_url=f"sqlite:///{tmp_path / 'state.db'}")
    return TestClient(create_app(settings)), StateStore(settings.resolved_state_db_url)


def _post(client: TestClient, source: str, body: bytes, headers: dict[str, str],
          kind: str = "") -> object:
    path = f"/v1/sources/{source}/changes" + (f"/{kind}" if kind else "")
    return client.post(path, content=body, headers={"content-type": "application/json",
                                                    **headers})


def _pending(store: StateStore, source: str) -> list[str]:
    return sorted(p.doc_id for p in store.pending_changes(source))


# -- who may notify ---------------------------------------------------------------------------


def test_a_notification_signed_with_the_sources_secret_is_recorded(api) -> None:
    client, store = api
    body = json.dumps({"doc_ids": ["a.md", "b/c.md", "a.md"]}).encode()

    response = _post(client, "docs", body, {SIGNATURE_HEADER: sign(SECRET, body, "docs")})

    assert response.status_code == 202, response.text
    assert response.json() == {"source": "docs", "recorded": 2, "list_changed": False}
    assert _pending(store, "docs") == ["a.md", "b/c.md"]


@pytest.mark.parametrize("signature", [
    None,                                              # missing
    "sha256=" + "0" * 64,                              # made up
    "not even the format",
])
def test_a_missing_or_bad_signature_is_401_and_records_nothing(api, signature) -> None:
    client, store = api
    body = json.dumps({"doc_ids": ["a.md"]}).encode()
    headers = {SIGNATURE_HEADER: signature} if signature else {}

    response = _post(client, "docs", body, headers)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert "request_id" in response.json()
    assert _pending(store, "docs") == []


def test_a_signature_over_another_body_is_401(api) -> None:
    client, store = api
    signed = json.dumps({"doc_ids": ["a.md"]}).encode()
    sent = json.dumps({"doc_ids": ["a.md", "../../etc/passwd"]}).encode()

    response = _post(client, "docs", sent, {SIGNATURE_HEADER: sign(SECRET, signed, "docs")})

    assert response.status_code == 401
    assert _pending(store, "docs") == []


def test_another_sources_signature_replayed_is_401_even_when_they_share_a_secret(
        api, monkeypatch) -> None:
    client, store = api
    body = json.dumps({"doc_ids": ["a.md"]}).encode()
    for_wiki = sign("another-sources-secret", body, "wiki")
    assert _post(client, "wiki", body, {SIGNATURE_HEADER: for_wiki}).status_code == 202

    assert _post(client, "docs", body, {SIGNATURE_HEADER: for_wiki}).status_code == 401
    monkeypatch.setenv(OTHER_ENV, SECRET)  # now both sources hold the same secret
    for_wiki = sign(SECRET, body, "wiki")
    assert _post(client, "docs", body, {SIGNATURE_HEADER: for_wiki}).status_code == 401
    assert _pending(store, "docs") == []


def test_a_source_without_a_secret_refuses_notifications_and_says_how_to_allow_them(
        api) -> None:
    client, store = api
    body = json.dumps({"doc_ids": ["a.md"]}).encode()

    response = _post(client, "quiet", body, {SIGNATURE_HEADER: sign("", body, "quiet")})

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert "notifications: {secret: {env: VAR}}" in response.json()["error"]["message"]
    assert _pending(store, "quiet") == []


def test_an_unknown_source_is_404_and_a_malformed_body_422(api) -> None:
    client, _ = api
    body = b'{"doc_ids": "not a list"}'
    assert _post(client, "nope", body, {}).json()["error"]["code"] == "not_found"
    response = _post(client, "docs", body, {SIGNATURE_HEADER: sign(SECRET, body, "docs")})
    assert (response.status_code, response.json()["error"]["code"]) == (422, "invalid_request")


# -- what each kind of sender says ------------------------------------------------------------


def test_sharepoint_handshake_echoes_the_validation_token_as_plain_text(api) -> None:
    client, store = api

    response = client.post("/v1/sources/teams/changes/sharepoint?validationtoken=abc%3C123")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "abc<123"
    assert _pending(store, "teams") == []
    refused = client.post("/v1/sources/quiet/changes/sharepoint?validationtoken=abc")
    assert refused.status_code == 422  # a folder source has no SharePoint subscription


def test_a_sharepoint_notification_with_the_client_state_reads_the_change_log(api) -> None:
    client, store = api
    entry = {"subscriptionId": "s1", "resource": "list-guid", "tenantId": "t",
             "siteUrl": "/sites/t", "webId": "w", "expirationDateTime": "2030-01-01T00:00:00Z"}
    good = json.dumps({"value": [{**entry, "clientState": SECRET}]}).encode()
    bad = json.dumps({"value": [{**entry, "clientState": SECRET},
                                {**entry, "clientState": "guess"}]}).encode()

    assert _post(client, "teams", bad, {}, "sharepoint").status_code == 401
    assert _pending(store, "teams") == []
    response = _post(client, "teams", good, {}, "sharepoint")
    assert response.status_code == 202
    assert response.json()["list_changed"] is True
    assert _pending(store, "teams") == [LIST_CHANGED]


def test_parse_sharepoint_needs_every_entrys_client_state() -> None:
    body = json.dumps({"value": [{"clientState": "s"}, {}]}).encode()
    with pytest.raises(NotificationRefused) as refused:
        parse_sharepoint("teams", body, "s")
    assert refused.value.status == 401
    assert parse_sharepoint("teams", b'{"value": [{"clientState": "s"}]}', "s") == ChangeNotice(
        "teams", list_changed=True)


def test_parse_confluence_names_content_as_the_connector_does() -> None:
    page = {"event": "page_updated", "page": {"id": 98305, "spaceKey": "ENG", "title": "Runbook"}}
    attachment = {"event": "attachment_created",
                  "attachment": {"id": "att7", "space": {"key": "HR"}}}

    assert parse_confluence("space", json.dumps(page).encode()).doc_ids == ("ENG/98305",)
    assert parse_confluence("space", json.dumps(attachment).encode()).doc_ids == ("HR/att7",)
    with pytest.raises(NotificationRefused) as refused:
        parse_confluence("space", b'{"event": "space_created", "space": {"key": "X"}}')
    assert refused.value.status == 422


def test_a_confluence_webhook_is_checked_against_its_hmac_header(api) -> None:
    client, store = api
    body = json.dumps({"event": "page_trashed", "page": {"id": 5, "spaceKey": "ENG"}}).encode()

    assert _post(client, "space", body, {CONFLUENCE_SIGNATURE_HEADER: sign("x", body)},
                 "confluence").status_code == 401
    response = _post(client, "space", body, {CONFLUENCE_SIGNATURE_HEADER: sign(SECRET, body)},
                     "confluence")
    assert response.status_code == 202
    assert _pending(store, "space") == ["ENG/5"]


def _s3_record(event: str, key: str, bucket: str = "kb-bucket") -> dict:
    return {"eventName": event, "s3": {"bucket": {"name": bucket}, "object": {"key": key}}}


def test_parse_s3_reads_created_and_removed_keys_of_the_sources_bucket() -> None:
    body = json.dumps({"Records": [
        _s3_record("ObjectCreated:Put", "policies/annual+leave%282026%29.md"),
        _s3_record("ObjectRemoved:Delete", "old/gone.txt"),
        _s3_record("ObjectCreated:Put", "x.md", bucket="someone-elses"),
        _s3_record("ObjectRestore:Completed", "archive.md"),
    ]}).encode()

    assert parse_s3("kb", body, "kb-bucket").doc_ids == (
        "policies/annual leave(2026).md", "old/gone.txt")
    envelope = json.dumps({"Type": "Notification", "Message": body.decode()}).encode()
    assert parse_s3("kb", envelope, "kb-bucket") == parse_s3("kb", body, "kb-bucket")
    assert parse_s3("kb", b'{"Event": "s3:TestEvent"}', "kb-bucket").doc_ids == ()


def test_an_s3_notification_needs_the_shared_secret_header(api) -> None:
    client, store = api
    body = json.dumps({"Records": [_s3_record("ObjectCreated:Put", "a.md")]}).encode()

    assert _post(client, "kb", body, {}, "s3").status_code == 401
    assert _post(client, "kb", body, {S3_SECRET_HEADER: "nope"}, "s3").status_code == 401
    assert _post(client, "kb", body, {S3_SECRET_HEADER: SECRET}, "s3").status_code == 202
    assert _pending(store, "kb") == ["a.md"]


# -- the pending table and the event ----------------------------------------------------------


def test_pending_changes_are_one_row_per_document_and_a_renotified_one_outlives_its_run(
        store: StateStore) -> None:
    store.note_changes("docs", ["a.md", "b.md"])
    store.note_changes("docs", ["a.md"])
    read = store.pending_changes("docs")
    assert sorted(p.doc_id for p in read) == ["a.md", "b.md"]

    store.note_changes("docs", ["b.md"])  # named again while a run indexes what it read
    assert store.clear_changes("docs", read) == 1

    assert [p.doc_id for p in store.pending_changes("docs")] == ["b.md"]
    assert store.pending_changes("other") == []


def test_the_event_names_the_source_and_a_capped_list_of_documents() -> None:
    many = tuple(f"doc-{i}.md" for i in range(1000))

    resource, payload = change_event(ChangeNotice("docs", many))

    assert resource == {"prefect.resource.id": "headwater.source.docs",
                        "headwater.source": "docs"}
    assert payload["doc_ids"] == list(many[:EVENT_DOC_IDS])
    assert (payload["count"], payload["truncated"]) == (1000, True)


def test_accepting_a_notice_records_before_it_announces(tmp_path) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    seen: list[tuple] = []

    def emit(event: str, resource: dict, payload: dict) -> None:
        seen.append((event, _pending(store, "docs"), payload["doc_ids"]))

    assert accept_changes(store, ChangeNotice("docs", ("a.md", "")), emit) == 1
    assert seen == [("headwater.document.changed", ["a.md"], ["a.md"])]
    assert accept_changes(store, ChangeNotice("docs"), emit) == 0  # nothing named: no event
    assert len(seen) == 1


def test_s3_looks_at_named_keys_exactly_as_its_listing_would(s3_endpoint) -> None:
    import boto3

    from connectors.base import ChangeKind
    from connectors.s3 import S3Connector
    from headwater.state import KnownDocument

    bucket = f"changes-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=bucket)
    for key in ("kb/same.md", "kb/edited.md", "kb/new.md", "kb/new.md.bak", "elsewhere.md"):
        s3.put_object(Bucket=bucket, Key=key, Body=f"# {key}".encode())
    connector = S3Connector(SourceConfig(
        name="kb", type="s3", principals={"": ["group:staff"]},
        params={"bucket": bucket, "prefix": "kb/", "endpoint_url": s3_endpoint}), client=s3)
    etag = s3.head_object(Bucket=bucket, Key="kb/same.md")["ETag"].strip('"')
    known = {"kb/same.md": KnownDocument("kb/same.md", etag, None, 1, ["group:staff"]),
             "kb/edited.md": KnownDocument("kb/edited.md", "old", None, 1, ["group:staff"]),
             "kb/gone.md": KnownDocument("kb/gone.md", "old", None, 1, ["group:staff"])}

    page = connector.changes_for(["kb/same.md", "kb/edited.md", "kb/new.md", "kb/gone.md",
                                  "kb/never.md", "elsewhere.md", "kb/new"], known)

    listed = {c.doc_id: c for p in connector.list_changes(None, known) for c in p.changes}
    assert {c.doc_id: c.kind for c in page.changes} == {
        "kb/edited.md": ChangeKind.MODIFIED, "kb/new.md": ChangeKind.ADDED,
        "kb/gone.md": ChangeKind.DELETED}
    assert page.unchanged == 1
    assert all(c == listed[c.doc_id] for c in page.changes)  # fingerprints included


# -- notified changes through the real flow ---------------------------------------------------


def _with_notifications(folder: FolderSource, monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    config = yaml.safe_load(folder.config.read_text())
    config["sources"][0]["notifications"] = {"secret": {"env": SECRET_ENV}}
    folder.config.write_text(yaml.safe_dump(config))
    get_settings.cache_clear()


def test_notified_changes_are_indexed_exactly_and_nothing_else_is_touched(
        folder: FolderSource, monkeypatch) -> None:
    from flows.ingest_changes import ingest_changes

    _with_notifications(folder, monkeypatch)
    for name in ("leave", "vpn", "expenses", "onboarding", "security", "travel"):
        folder.write(f"{name}.md", f"# {name.title()}\n\nThe {name} policy, first edition.\n")
    folder.sync()
    synced_at = _last_success(folder)
    before = folder.index()
    times = folder.update_times()
    folder.write("leave.md", "# Leave\n\nEvery employee has 27 days of annual leave.\n")
    folder.write("vpn.md", "# VPN\n\nConnect to the VPN with the new client.\n")
    folder.write("hr/benefits.md", "# Benefits\n\nThe gym is paid for.\n")
    (folder.docs / "travel.md").unlink()
    folder.write("security.md", "# Security\n\nChanged, but nobody said so.\n")  # not notified
    body = json.dumps({"doc_ids": ["leave.md", "vpn.md", "hr/benefits.md", "travel.md"]})

    response = _post(TestClient(create_app(Settings())), "handbook", body.encode(),
                     {SIGNATURE_HEADER: sign(SECRET, body.encode(), "handbook")})
    assert response.status_code == 202, response.text
    state = ingest_changes("handbook", return_state=True)

    assert state.is_completed(), state
    summary = state.result()
    assert (summary["new"], summary["changed"], summary["deleted"]) == (1, 2, 1)
    index = folder.index()
    assert sorted(index) == ["expenses.md", "hr/benefits.md", "leave.md", "onboarding.md",
                             "security.md", "vpn.md"]
    assert index["leave.md"] == ["Leave\n\nEvery employee has 27 days of annual leave."]
    assert index["security.md"] == before["security.md"]  # not notified: not read
    after = folder.update_times()
    untouched = [u for u in times if u in after and after[u] == times[u]]
    assert len(untouched) == len(times) - 3  # only leave, vpn and travel's chunks moved
    assert folder.store.pending_changes("handbook") == []
    # Indexing notified changes says nothing of the rest of the source: it is not a sync.
    assert summary["kind"] == "changes"
    assert [e.outcome for e in folder.store.audit_entries("ingest.changes")] == ["completed"]
    assert _last_success(folder) == synced_at
    # What sync_source then finds is only the change nobody notified.
    summary = folder.sync()
    assert (summary["new"], summary["changed"], summary["deleted"]) == (0, 1, 0), summary
    assert summary["kind"] == "sync" and _last_success(folder) > synced_at


def _last_success(folder: FolderSource) -> object:
    from headwater.health import last_successes

    return last_successes(get_settings())["handbook"]


def test_a_notification_for_a_file_outside_the_root_reads_nothing(
        folder: FolderSource, tmp_path) -> None:
    from flows.ingest_changes import ingest_changes

    (tmp_path / "secret.md").write_text("# Secret\n\nOutside the source.\n")
    folder.write("a.md", "# A\n\nInside.\n")
    folder.store.note_changes("handbook", ["../secret.md", "/etc/hostname", "a.md"])

    summary = ingest_changes("handbook")

    assert sorted(folder.index()) == ["a.md"]
    assert summary["new"] == 1
    assert folder.store.pending_changes("handbook") == []


def test_a_run_with_nothing_pending_ends_without_opening_the_source(
        folder: FolderSource) -> None:
    from flows.ingest_changes import ingest_changes

    (folder.docs).rmdir()  # opening this source would fail

    state = ingest_changes("handbook", return_state=True)

    assert state.is_completed() and "no change" in state.message


# -- the folder watcher -----------------------------------------------------------------------


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def test_the_watcher_records_a_burst_of_file_changes_as_one_notice(tmp_path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "old.md").write_text("old")
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    events: list[dict] = []
    source = SourceConfig(name="watched", type="folder", params={"root": str(root)})

    def deliver(notice: ChangeNotice) -> None:
        accept_changes(store, notice, lambda event, resource, payload: events.append(payload))

    watcher = FolderWatcher([source], deliver, quiet_s=0.5).start()
    try:
        (root / "a.md").write_text("a")
        (root / "sub" / "b.md").write_text("b")
        (root / ".a.md.swp").write_text("editor scratch")  # excluded by the default globs
        (root / "old.md").unlink()
        _wait_for(lambda: len(_pending(store, "watched")) >= 3, 10, "three pending changes")
        time.sleep(1.0)  # nothing more arrives
    finally:
        watcher.stop()

    assert _pending(store, "watched") == ["a.md", "old.md", "sub/b.md"]
    assert len(events) == 1, events  # one burst, one event
    assert events[0]["doc_ids"] == ["a.md", "old.md", "sub/b.md"]


# -- the deployment's trigger, on the real Prefect server and a worker ------------------------


def test_a_burst_of_change_events_starts_few_runs_that_index_exactly_those_documents(
        local_stack, weaviate_client, collection, tmp_path) -> None:
    from prefect._internal.concurrency.services import QueueService

    token = uuid.uuid4().hex[:8]
    source, pool, name = f"events-{token}", f"headwater-events-test-{token}", \
        f"ingest-changes-{token}"
    root = tmp_path / "docs"
    root.mkdir()
    (tmp_path / "headwater.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": source, "type": "folder", "params": {"root": str(root)},
         "principals": {"": ["group:staff"]}}]}))
    env = {"HEADWATER_CONFIG": str(tmp_path / "headwater.yaml"),
           "HEADWATER_STATE_DB_URL": f"sqlite:///{tmp_path / 'state.db'}",
           "HEADWATER_COLLECTION": collection, "HEADWATER_DATA_DIR": str(tmp_path / "data")}
    # The repository's deployment as declared, on a pool of this test's own, for this test's
    # source only (other tests' events must not start runs here), configured by job env.
    declared = next(d for d in yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())[
        "deployments"] if d["name"] == "ingest-changes")
    project = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    project["deployments"] = [{
        **declared, "name": name, "work_pool": {"name": pool, "job_variables": {"env": env}},
        "triggers": [{**t, "match": {"headwater.source": source}}
                     for t in declared["triggers"]]}]
    copy = tmp_path / "prefect.yaml"
    copy.write_text(yaml.safe_dump(project, sort_keys=False))

    # A worker waits for the flow runs it started; one the trigger started late may still be
    # running at the end, so after a grace period the worker and its runs are killed.
    with deployed_on_own_pool(copy, pool, grace_s=30):
        time.sleep(8)  # the server loads new automations on its next periodic evaluation

        store = StateStore(env["HEADWATER_STATE_DB_URL"])
        wanted = [f"notes/note-{i:02}.md" for i in range(50)]
        for rel in wanted:
            (root / rel).parent.mkdir(exist_ok=True)
            (root / rel).write_text(f"# Note {rel[-5:-3]}\n\nWhat was decided in meeting "
                                    f"{rel[-5:-3]}.\n")
            accept_changes(store, ChangeNotice(source, (rel,)))
        QueueService.drain_all(timeout=30)  # the 50 events are on the server
        sent = time.monotonic()

        def settled() -> bool:
            runs = deployment_runs(name)
            # Past the quiet trigger's window (10 s, evaluated every 5 s), every run ended.
            return (time.monotonic() - sent > 30 and bool(runs)
                    and all(r.state.is_final() for r in runs))

        _wait_for(settled, 400, "the triggered ingest-changes runs to finish")
        runs = deployment_runs(name)

    assert 1 <= len(runs) <= 3, [(r.name, r.state.type) for r in runs]
    assert all(r.parameters == {"source": source} for r in runs)
    assert any(r.state.is_completed() for r in runs), [r.state for r in runs]
    assert all(r.state.is_completed() or r.state.is_cancelled() for r in runs), [
        (r.state.type, r.state.message) for r in runs]
    assert sorted(indexed_texts(weaviate_client, collection)) == wanted
    assert store.pending_changes(source) == []
