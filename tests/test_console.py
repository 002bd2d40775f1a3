"""The web console, driven in headless Chromium against a real server, stack and worker."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import deployed_on_own_pool, free_port
from fastapi.testclient import TestClient

from headwater.settings import PROJECT_ROOT, Settings, get_settings

SECRET = "console-test-signing-secret-of-enough-length"
KEY = "subject-key-of-the-console-tests-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("HEADWATER_TEST_ARTIFACTS")
                 or PROJECT_ROOT / ".data" / "test-artifacts" / "console")

# The restricted document's title (a folder document's title is its file name) and words.
RESTRICTED = "hr/compensation-ladder-confidential.md"
RESTRICTED_TITLE = "compensation-ladder-confidential"
RESTRICTED_WORDS = "61,000"
# A restricted file that fails to parse: quarantined, never indexed.
BROKEN = "hr/payroll-export-unreadable.pdf"
JANE = "jane.roe@example.com"
SAM = "sam.lee@example.com"
DOCUMENTS = {
    RESTRICTED: "# Compensation ladder\n\nEngineers in band B3 earn between 61,000 and 75,000 "
                "euros. The compensation ladder is reviewed every March.\n",
    BROKEN: b"%PDF-1.7\nthis is not a PDF at all\n",
    "leave.md": "# Annual leave\n\nEvery employee has 25 days of annual leave per year, "
                "booked in the staff portal.\n",
    "desk/contacts.md": "# Spares desk\n\nImpeller seals are kept in hall two.\n\n## Orders\n\n"
                        f"Orders for gaskets go to {JANE} before noon on weekdays.\n\n"
                        "## Stock\n\nThe stock of flange bolts is counted every Friday.\n",
    "finance/refunds.md": f"# Refunds\n\nQuestions about a refund of a pump repair: {SAM}.\n",
    "public/pump.md": "# BP-200 pump\n\nThe BP-200 pump moves 200 litres of water per minute.\n",
}


@dataclass
class Console:
    url: str
    source: str
    docs: Path
    settings: Settings
    worker_log: Path


def _write(docs: Path, rel: str, content: str | bytes) -> None:
    path = docs / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)


def _project(path: Path, source: dict, pool: str, token: str, env: dict[str, str]) -> Path:
    """prefect.yaml with the source's sync deployment (as `headwater deploy` writes it) and the
    repository's data-subject-request deployment, renamed, on a pool of this module's own."""
    from headwater.config import SourceConfig
    from headwater.deploy import sync_deployment

    project = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    privacy = next(d for d in project["deployments"] if d["name"] == "data-subject-request")
    sync = sync_deployment(SourceConfig.model_validate(source), pool)
    sync.pop("schedules", None)  # only the console starts runs here
    on_pool = {"name": pool, "job_variables": {"env": env}}
    project["deployments"] = [{**sync, "work_pool": on_pool},
                              {**privacy, "name": f"data-subject-request-{token}",
                               "work_pool": on_pool}]
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def console(tmp_path_factory, local_stack, request) -> Iterator[Console]:
    """A synced folder source, its deployments on a pool and worker of this module's own, and
    the API (console included) in a real uvicorn server on a free loopback port."""
    import uvicorn

    from flows.sync import sync_source
    from headwater.api import create_app
    from tasks.index import connect_index, delete_index

    token = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("console")
    source, pool = f"console-{token}", f"headwater-console-test-{token}"
    docs = root / "docs"
    for rel, content in DOCUMENTS.items():
        _write(docs, rel, content)
    declared = {"name": source, "type": "folder", "params": {"root": str(docs)},
                "policy": ["gdpr"], "schedule": {"interval_s": 3600},
                "principals": {"": ["group:staff"], "hr/": ["group:hr"],
                               "public/": ["public"]}}
    (root / "headwater.yaml").write_text(yaml.safe_dump({"sources": [declared]}))
    env = {"HEADWATER_CONFIG": str(root / "headwater.yaml"),
           "HEADWATER_STATE_DB_URL": f"sqlite:///{root / 'state.db'}",
           "HEADWATER_COLLECTION": f"TestConsole{token}",
           "HEADWATER_DATA_DIR": str(root / "data"), "HEADWATER_SUBJECT_KEY": KEY,
           "HEADWATER_WORK_POOL": pool, "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as patch, connect_index(get_settings()) as client:
        for name, value in env.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        try:
            state = sync_source(source, return_state=True)
            assert state.is_completed(), state
            assert state.result()["quarantined"] == 1, state.result()
            settings = Settings(jwt_secret=SECRET, console_dev_login=True)
            worker_log = root / "worker.log"
            with deployed_on_own_pool(_project(root / "prefect.yaml", declared, pool, token,
                                               env), pool, worker_log, grace_s=30):
                port = free_port()
                server = uvicorn.Server(uvicorn.Config(
                    create_app(settings), host="127.0.0.1", port=port, log_config=None,
                    access_log=False))
                thread = threading.Thread(target=server.run, name="console-api", daemon=True)
                thread.start()
                deadline = time.monotonic() + 120
                while not server.started:
                    assert thread.is_alive() and time.monotonic() < deadline, (
                        "the console's server did not start")
                    time.sleep(0.2)
                try:
                    yield Console(f"http://127.0.0.1:{port}", source, docs, settings,
                                  worker_log)
                finally:
                    server.should_exit = True
                    thread.join(timeout=30)
        finally:
            get_settings.cache_clear()
            delete_index(client, env["HEADWATER_COLLECTION"])
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter:
                reporter.write_line(f"console screenshots: {ARTIFACTS}")


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[object]:
    """Debian's Chromium, headless, through Playwright (no browser is downloaded); every
    launch gets a fresh temporary profile."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def sign_in(browser, console: Console) -> Iterator[Callable[..., object]]:
    """A fresh browser context per user, signed in through the dev-login form."""
    contexts = []

    def as_user(user: str, groups: list[str], roles: list[str]) -> object:
        context = browser.new_context(accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(console.url + "/")
        page.get_by_label("User id").fill(user)
        page.get_by_label("Groups (comma-separated)").fill(",".join(groups))
        for role in ("admin", "compliance_officer", "power_user", "readonly", "user"):
            page.get_by_label(role, exact=True).set_checked(role in roles)
        page.get_by_role("button", name="Sign in as this user").click()
        page.wait_for_url(re.compile(r"/console/"))
        return page

    yield as_user
    for context in contexts:
        context.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _ask(page, console: Console, question: str) -> None:
    page.goto(console.url + "/console/ask")
    page.get_by_label("Your question").fill(question)
    page.get_by_role("button", name="Ask", exact=True).click()
    page.locator("#answer").wait_for()


def _csrf(page) -> str:
    return page.locator("input[name=csrf_token]").first.get_attribute("value")


def _wait_for(page, url: str, ready: Callable[[], bool], timeout_s: float, what: str,
              console: Console) -> None:
    """Reload the page until `ready` says so, as a person following a run would."""
    deadline = time.monotonic() + timeout_s
    while True:
        page.goto(url)
        if ready():
            return
        assert time.monotonic() < deadline, (
            f"{what} within {timeout_s:.0f} s\n{page.content()[-3000:]}\n--- worker log ---\n"
            + console.worker_log.read_text()[-4000:])
        time.sleep(2)


ALICE = ("alice", ["staff", "hr"], ["user"])
BOB = ("bob", ["staff"], ["user"])
ADMIN = ("ada", ["staff"], ["admin"])
OFFICER = ("olga", ["staff"], ["compliance_officer"])


# -- asking --------------------------------------------------------------------------------------


def test_asking_by_keyboard_shows_an_answer_with_inline_citations_and_its_sources(
        sign_in, console: Console) -> None:
    page = sign_in(*ALICE)
    page.goto(console.url + "/console/ask")
    # Keyboard only: tab to the question box, type, press Enter.
    for _ in range(15):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "question":
            break
    else:
        pytest.fail("the question box cannot be reached with the Tab key")
    page.keyboard.type("How many days of annual leave does every employee have?")
    page.keyboard.press("Enter")
    page.locator("#answer").wait_for()
    assert page.locator("#progress").inner_text() == "Answer ready."  # the aria-live state

    citation = page.locator("#answer .answer a.citation").first
    assert citation.inner_text() == "[1]" and citation.get_attribute("href") == "#source-1"
    first = page.locator("#source-1")
    assert "leave" in first.locator(".source-title").inner_text()
    assert first.locator(".source-title a").get_attribute("href").startswith("file://")
    meta = first.locator(".meta").inner_text()
    assert console.source in meta and "leave.md" in meta
    assert re.search(r"modified \d{4}-\d\d-\d\d \d\d:\d\d UTC", meta), meta
    assert "25 days of annual leave" in first.locator("blockquote").inner_text()
    _shot(page, "ask")

    # A thumbs up is recorded through /v1/feedback's own code.
    page.get_by_role("button", name="Helpful", exact=True).click()
    assert "your rating was recorded" in page.get_by_role("status").first.inner_text()
    from headwater.state import StateStore

    ratings = StateStore(console.settings.resolved_state_db_url).audit_entries("query.feedback")
    assert [(e.actor, e.outcome) for e in ratings][-1] == ("user:alice", "up")


def test_a_user_of_another_group_never_sees_a_restricted_documents_title(
        sign_in, console: Console) -> None:
    question = "What do engineers earn in band B3 of the compensation ladder?"
    alice = sign_in(*ALICE)
    _ask(alice, console, question)
    assert RESTRICTED_TITLE in alice.content()  # the question does reach the document

    bob = sign_in(*BOB)
    _ask(bob, console, question)
    _shot(bob, "ask-other-group")
    seen = {"ask": bob.content()}
    for name in ("sources", "quarantine"):
        bob.goto(f"{console.url}/console/{name}")
        seen[name] = bob.content()
    _shot(bob, "quarantine-other-group")
    for page, html in seen.items():
        for secret in (RESTRICTED_TITLE, RESTRICTED_WORDS, "payroll-export-unreadable"):
            assert secret not in html, (page, secret)
    assert "1 more are not shown" in seen["quarantine"]

    admin = sign_in(*ADMIN)
    admin.goto(console.url + "/console/quarantine")
    assert BROKEN in admin.content()  # the row bob was not shown is there
    _shot(admin, "quarantine")


# -- roles -----------------------------------------------------------------------------------


def test_a_user_without_rag_admin_sees_no_admin_actions_and_a_hand_crafted_post_is_refused(
        sign_in, console: Console) -> None:
    bob = sign_in(*BOB)
    assert [a.inner_text() for a in bob.get_by_role("navigation").get_by_role("link").all()
            ] == ["Ask", "Sources", "Quarantine"]
    bob.goto(console.url + "/console/sources")
    assert bob.get_by_role("button", name=re.compile("Sync now")).count() == 0
    bob.goto(console.url + "/console/quarantine")
    assert bob.get_by_role("button", name=re.compile("Retry")).count() == 0
    csrf = _csrf(bob)
    refused = bob.request.post(f"{console.url}/console/sources/{console.source}/sync",
                               form={"csrf_token": csrf}, max_redirects=0)
    assert refused.status == 403 and "rag:admin" in refused.text()
    refused = bob.request.post(f"{console.url}/console/quarantine/retry", max_redirects=0,
                               form={"csrf_token": csrf, "source": console.source,
                                     "doc_id": BROKEN})
    assert refused.status == 403
    bob.goto(console.url + "/console/privacy")
    assert bob.get_by_role("heading", level=1).inner_text() == "Not allowed"

    from headwater.state import StateStore

    store = StateStore(console.settings.resolved_state_db_url)
    refusals = [e for e in store.audit_entries("console.refused") if e.actor == "user:bob"]
    assert {e.resource for e in refusals} >= {
        f"POST /console/sources/{console.source}/sync", "POST /console/quarantine/retry"}
    assert store.audit_entries("console.sync") == []  # nothing was started


def test_a_post_without_the_csrf_token_is_refused_even_for_an_admin(
        sign_in, console: Console) -> None:
    admin = sign_in(*ADMIN)
    refused = admin.request.post(f"{console.url}/console/sources/{console.source}/sync",
                                 form={"csrf_token": "forged"}, max_redirects=0)
    assert refused.status == 403 and "did not come from the console" in refused.text()
    refused = admin.request.post(f"{console.url}/console/sources/{console.source}/sync",
                                 max_redirects=0)
    assert refused.status == 403


# -- sources and syncs -----------------------------------------------------------------------


def test_an_admin_triggers_a_sync_through_its_deployment_and_sees_the_count_go_up(
        sign_in, console: Console) -> None:
    admin = sign_in(*ADMIN)
    admin.goto(console.url + "/console/sources")
    row = admin.locator(f"tr[data-source='{console.source}']")
    before = int(row.locator("td.documents").inner_text())
    assert before == 5 and int(row.locator("td.chunks").inner_text()) >= 5
    assert row.get_by_role("link", name=f"sync-{console.source} in Prefect").count() == 1
    _shot(admin, "sources")

    _write(console.docs, "travel.md", "# Travel\n\nTrain journeys under six hours are booked "
                                      "in second class.\n")
    row.get_by_role("button", name=f"Sync now: {console.source}").click()
    started = admin.locator("#started-run")
    run_url = started.get_by_role("link").get_attribute("href")
    assert "/runs/flow-run/" in run_url

    _wait_for(admin, admin.url, lambda: admin.locator("#started-run .state").inner_text()
              in ("Completed", "Failed", "Crashed", "Cancelled"), 300,
              "the sync run did not end", console)
    assert admin.locator("#started-run .state").inner_text() == "Completed"
    after = admin.locator(f"tr[data-source='{console.source}'] td.documents").inner_text()
    assert int(after) == before + 1
    _shot(admin, "sources-after-sync")


# -- privacy ---------------------------------------------------------------------------------


def _file_request(page, console: Console, kind: str, email: str) -> str:
    page.goto(console.url + "/console/privacy")
    page.get_by_role("radio", name=re.compile(kind.title())).check()
    page.get_by_label("E-mail address").fill(email)
    page.get_by_role("button", name="File request").click()
    page.wait_for_url(re.compile(r"/console/privacy\?run="))
    run_id = page.url.rsplit("=", 1)[1]
    row = f"tr[data-run='{run_id}']"
    _wait_for(page, page.url, lambda: page.locator(f"{row} td.state").inner_text()
              in ("Completed", "Failed", "Crashed", "Cancelled"), 300,
              f"the {kind} request did not end", console)
    assert page.locator(f"{row} td.state").inner_text() == "Completed"
    return run_id


def _identifiers_block_gone(run_id: str, console: Console) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(uuid.UUID(run_id))
        # The server holds no identifier: only the name of the block that held them.
        assert run.parameters["identifiers"] is None
        assert JANE not in json.dumps(run.parameters) and SAM not in json.dumps(run.parameters)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.read_block_document_by_name(run.parameters["identifiers_secret"],
                                                   block_type_slug="secret")
            except ObjectNotFound:
                return
            assert time.monotonic() < deadline, "the identifiers' Secret block was not deleted"
            time.sleep(1)


def test_an_erasure_request_completes_and_the_erased_passage_is_no_longer_shown(
        sign_in, console: Console) -> None:
    officer = sign_in(*OFFICER)
    _ask(officer, console, "Where do orders for gaskets go before noon?")
    assert "gaskets go to" in officer.locator("#answer").inner_text()

    run_id = _file_request(officer, console, "erasure", JANE)
    row = officer.locator(f"tr[data-run='{run_id}']")
    assert "completed" in row.inner_text() and "chunks erased: 1" in row.inner_text()
    _shot(officer, "privacy")
    _identifiers_block_gone(run_id, console)

    _ask(officer, console, "Where do orders for gaskets go before noon?")
    assert "gaskets go to" not in officer.locator("#answer").inner_text()
    _shot(officer, "ask-after-erasure")


def test_an_access_requests_export_downloads_for_the_compliance_officer(
        sign_in, console: Console) -> None:
    officer = sign_in(*OFFICER)
    run_id = _file_request(officer, console, "access", SAM)
    with officer.expect_download() as download:
        officer.locator(f"tr[data-run='{run_id}']").get_by_role(
            "link", name="Download export").click()
    export = json.loads(Path(download.value.path()).read_text())
    assert [d["doc_id"] for d in export["results"]] == ["finance/refunds.md"]
    assert SAM not in json.dumps(export)  # indexed text was redacted by the policy
    _identifiers_block_gone(run_id, console)

    bob = sign_in(*BOB)
    response = bob.request.get(f"{console.url}/console/privacy/{run_id}/export")
    assert response.status == 403


def test_the_audit_view_pages_entries_and_verifies_the_chain(sign_in, console: Console) -> None:
    officer = sign_in(*OFFICER)
    officer.goto(console.url + "/console/audit")
    assert "console.dev_login" in officer.content()
    officer.get_by_role("button", name="Verify chain").click()
    assert officer.locator("#verdict").inner_text().startswith("Audit trail intact:")
    _shot(officer, "audit")


# -- accessibility ---------------------------------------------------------------------------

UNNAMED_CONTROLS = """() => [...document.querySelectorAll(
    'input:not([type=hidden]), select, textarea, button, a[href]')].filter(el =>
    !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
    && !el.textContent.trim()).map(el => el.outerHTML)"""


def test_every_page_has_one_h1_landmarks_and_named_controls(sign_in, console: Console) -> None:
    page = sign_in("root", ["staff"], ["admin"])
    page.goto(console.url + "/console/sign-in")
    for path in ("/console/sign-in", "/console/ask", "/console/sources", "/console/quarantine",
                 "/console/privacy", "/console/audit"):
        page.goto(console.url + path)
        assert page.locator("h1").count() == 1, path
        assert page.locator("header").count() == page.locator("main").count() == 1, path
        assert page.evaluate(UNNAMED_CONTROLS) == [], path
        assert page.locator("table th[scope]").count() == page.locator("table th").count()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.context.clear_cookies()
    page.goto(console.url + "/console/sign-in")
    assert page.get_by_role("textbox", name="Bearer token").is_visible()
    _shot(page, "sign-in")


# -- sign-in, unit level ---------------------------------------------------------------------


def _form_token(client: TestClient) -> str:
    page = client.get("/console/sign-in")
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def test_dev_login_is_refused_from_a_non_loopback_address_and_when_disabled(
        console: Console) -> None:
    form = {"user_id": "mallory", "groups": "hr", "roles": "admin"}
    with TestClient(create_app_of(console, console_dev_login=True),
                    client=("203.0.113.7", 40000)) as remote:
        assert "Dev login" not in remote.get("/console/sign-in").text
        refused = remote.post("/console/dev-login", data={**form, "csrf_token":
                                                          _form_token(remote)})
        assert refused.status_code == 403 and "headwater_console=" not in str(refused.headers)
    with TestClient(create_app_of(console, console_dev_login=False),
                    client=("127.0.0.1", 40000)) as local:
        refused = local.post("/console/dev-login", data={**form, "csrf_token":
                                                         _form_token(local)})
        assert refused.status_code == 403


def test_with_the_console_disabled_the_api_serves_no_console_pages(console: Console) -> None:
    api = TestClient(create_app_of(console, console_enabled=False))
    assert api.get("/console/sign-in").status_code == 404
    assert api.get("/", follow_redirects=False).status_code == 404
    enabled = TestClient(create_app_of(console))
    assert enabled.get("/", follow_redirects=False).headers["location"] == "/console"


def test_a_pasted_token_signs_in_until_it_expires_and_sign_out_clears_it(
        console: Console) -> None:
    import jwt

    token = jwt.encode({"sub": "alice", "groups": ["staff"], "roles": ["user"],
                        "aud": "headwater", "exp": int(time.time()) + 600}, SECRET, "HS256")
    with TestClient(create_app_of(console), base_url="https://console.test") as client:
        assert client.post("/console/sign-in", data={"token": token}).status_code == 403
        signed = client.post("/console/sign-in", data={"token": token,
                                                       "csrf_token": _form_token(client)},
                             follow_redirects=False)
        cookie = signed.headers["set-cookie"]
        assert signed.status_code == 303
        for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/console"):
            assert flag.lower() in cookie.lower(), cookie
        assert 590 <= int(re.search(r"Max-Age=(\d+)", cookie, re.I).group(1)) <= 600, cookie
        page = client.get("/console/ask")
        assert page.status_code == 200 and "Signed in as <strong>alice" in page.text
        bad = client.post("/console/sign-in", data={"token": token[:-4] + "AAAA",
                                                    "csrf_token": _form_token(client)})
        assert bad.status_code == 401 and "not accepted" in bad.text
        client.post("/console/sign-out", data={"csrf_token": _form_token(client)})
        assert client.get("/console/ask", follow_redirects=False).headers["location"] == (
            "/console/sign-in")


def create_app_of(console: Console, **changes: object) -> object:
    from headwater.api import create_app

    return create_app(console.settings.model_copy(update=changes))
