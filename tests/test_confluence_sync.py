"""A Confluence source synced through `sync_source` into the real Weaviate, from the emulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import yaml
from conftest import indexed_texts
from fastapi.testclient import TestClient

from connectors.confluence import storage_to_markdown
from flows.sync import sync_source
from headwater.api import create_app
from headwater.errors import SourceError, TransientError
from headwater.settings import Settings, get_settings
from headwater.state import StateStore
from tests.emulators.confluence import ConfluenceEmulator

SECRET = "test-signing-secret-of-enough-length"
TOKEN = "confluence-test-token"

DEPLOY = ("<h1>Deploying telemetry</h1><p>Deploy the pump telemetry service with the "
          "<strong>release pipeline</strong>, then watch the error dashboard.</p>")
SALARY = ("<h2>Salary bands</h2><table><tbody><tr><th>Band</th><th>Range</th></tr>"
          "<tr><td>B3</td><td>61,000 to 75,000 euros</td></tr></tbody></table>")
LEAVE = "<p>Every employee has 25 days of annual leave per year, announced in this post.</p>"
RUNBOOK = b"# Pump runbook\n\nRestart the BP-200 pump controller when the pressure alarm sounds."


class Wiki:
    """The emulator, a sources file naming it, a state DB and a collection, of one test."""

    def __init__(self, root: Path, collection: str, client, monkeypatch: pytest.MonkeyPatch,
                 deployment: str = "cloud", **params: object) -> None:
        self.emulator = ConfluenceEmulator(deployment, secret=TOKEN)
        self.emulator.start()
        self.collection, self.client = collection, client
        self.emulator.add_space("ENG", ["group:engineering"])
        self.emulator.add_space("HR", ["group:hr"])
        credentials = ({"email": self.emulator.user, "api_token": {"env": "WIKI_TOKEN"}}
                       if deployment == "cloud" else {"token": {"env": "WIKI_TOKEN"}})
        self.config = root / "headwater.yaml"
        self.config.write_text(yaml.safe_dump({"sources": [{
            "name": "wiki", "type": "confluence", "batch_size": params.pop("batch_size", 16),
            "throttling": {"attempts": params.pop("attempts", 6), "base_s": 0.05},
            "params": {"url": self.emulator.url + self.emulator.prefix,
                       "deployment": deployment, "spaces": ["ENG", "HR"],
                       **credentials, **params},
        }]}))
        self.state_db = f"sqlite:///{root / 'state.db'}"
        for key, value in {"HEADWATER_CONFIG": str(self.config), "WIKI_TOKEN": TOKEN,
                           "HEADWATER_STATE_DB_URL": self.state_db,
                           "HEADWATER_COLLECTION": collection}.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        self.store = StateStore(self.state_db)

    def sync(self) -> dict:
        state = sync_source("wiki", return_state=True)
        assert state.is_completed(), state
        return state.result()

    def failed_sync(self) -> BaseException:
        state = sync_source("wiki", return_state=True)
        assert state.is_failed(), state
        return state.result(raise_on_failure=False)

    def index(self) -> dict[str, list[str]]:
        return indexed_texts(self.client, self.collection)

    def readers(self) -> dict[str, set[tuple[str, ...]]]:
        found: dict[str, set[tuple[str, ...]]] = {}
        for obj in self.client.collections.use(self.collection).iterator():
            found.setdefault(obj.properties["doc_id"], set()).add(
                tuple(sorted(obj.properties["principals"])))
        return found

    def api(self) -> TestClient:
        return TestClient(create_app(Settings(collection=self.collection,
                                              state_db_url=self.state_db, jwt_secret=SECRET)))


def _token(sub: str, groups: list[str]) -> str:
    claims = {"sub": sub, "groups": groups, "roles": ["user"], "aud": "headwater",
              "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _shown(api: TestClient, question: str, sub: str, groups: list[str]) -> set[str]:
    """The documents a caller is shown for a question, through the HTTP API."""
    response = api.post("/v1/query", json={"question": question, "top_k": 10},
                        headers={"Authorization": f"Bearer {_token(sub, groups)}"})
    assert response.status_code == 200, response.text
    return {s["doc_id"] for s in response.json()["sources"]}


@pytest.fixture
def wiki(tmp_path, collection, weaviate_client, monkeypatch) -> Iterator[Wiki]:
    source = Wiki(tmp_path, collection, weaviate_client, monkeypatch)
    yield source
    source.emulator.stop()
    get_settings.cache_clear()


def _wiki(request: pytest.FixtureRequest, deployment: str = "cloud", **params: object) -> Wiki:
    """A wiki with non-default settings, stopped when the test ends."""
    source = Wiki(request.getfixturevalue("tmp_path"), request.getfixturevalue("collection"),
                  request.getfixturevalue("weaviate_client"),
                  request.getfixturevalue("monkeypatch"), deployment, **params)
    request.addfinalizer(source.emulator.stop)
    request.addfinalizer(get_settings.cache_clear)
    return source


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
def test_two_spaces_are_indexed_with_pages_blog_posts_attachments_and_their_readers(
    request: pytest.FixtureRequest, deployment: str
) -> None:
    wiki = _wiki(request, deployment)
    confluence = wiki.emulator
    deploy = confluence.add_page("ENG", "Deploying telemetry", DEPLOY)
    runbook = confluence.add_attachment(deploy, "runbook.md", RUNBOOK, "text/markdown")
    confluence.add_attachment(deploy, "diagram.png", b"\x89PNG\r\n", "image/png")
    salary = confluence.add_page("HR", "Salary bands", SALARY)
    leave = confluence.add_blog_post("HR", "Annual leave", LEAVE)

    summary = wiki.sync()
    assert (summary["new"], summary["quarantined"]) == (4, 0), summary
    index = wiki.index()
    assert index == {
        f"ENG/{deploy}": ["Deploying telemetry\n\nDeploy the pump telemetry service with the "
                          "release pipeline, then watch the error dashboard."],
        f"ENG/{runbook}": ["Pump runbook\n\nRestart the BP-200 pump controller when the "
                           "pressure alarm sounds."],
        f"HR/{salary}": ["Salary bands\n\n| Band | Range |\n| B3 | 61,000 to 75,000 euros |"],
        f"HR/{leave}": ["Every employee has 25 days of annual leave per year, announced in "
                        "this post."],
    }
    # An attachment is read by whoever reads its page; the image never became a document.
    assert wiki.readers() == {f"ENG/{deploy}": {("group:engineering",)},
                              f"ENG/{runbook}": {("group:engineering",)},
                              f"HR/{salary}": {("group:hr",)}, f"HR/{leave}": {("group:hr",)}}
    with wiki.api() as api:
        bob = _shown(api, "How do I restart the pump controller and deploy telemetry?", "bob",
                     ["engineering"])
        assert bob and bob <= {f"ENG/{deploy}", f"ENG/{runbook}"}
        alice = _shown(api, "What does band B3 earn, and how much annual leave?", "alice",
                       ["hr"])
        assert alice and alice <= {f"HR/{salary}", f"HR/{leave}"}
    # Nothing changed: the next run reads the changes since its cursor and embeds nothing.
    again = wiki.sync()
    assert (again["new"], again["changed"], again["embedded"]) == (0, 0, 0)


def test_edits_new_pages_trash_and_restrictions_reach_the_index_and_its_readers(
    request: pytest.FixtureRequest,
) -> None:
    wiki = _wiki(request, "cloud", reconcile_every_s=0)
    confluence = wiki.emulator
    deploy = confluence.add_page("ENG", "Deploying telemetry", DEPLOY)
    old = confluence.add_page("ENG", "Old VPN guide", "<p>Use the legacy VPN client.</p>")
    salary = confluence.add_page("HR", "Salary bands", SALARY)
    assert wiki.sync()["new"] == 3

    confluence.edit_page(deploy, "<h1>Deploying telemetry</h1><p>Deploy with the "
                                 "<ac:structured-macro ac:name=\"status\"><ac:parameter "
                                 "ac:name=\"title\">NEW</ac:parameter></ac:structured-macro> "
                                 "blue-green pipeline.</p>")
    confluence.trash_page(old)
    new = confluence.add_page("ENG", "Pump alarms", "<ul><li>Pressure alarm: restart the "
                                                    "controller</li></ul>", parent=deploy)
    summary = wiki.sync()
    assert (summary["new"], summary["changed"], summary["deleted"]) == (1, 1, 1), summary
    index = wiki.index()
    assert index[f"ENG/{deploy}"] == ["Deploying telemetry\n\nDeploy with the NEW blue-green "
                                      "pipeline."]
    assert index[f"ENG/{new}"] == ["- Pressure alarm: restart the controller"]
    assert f"ENG/{old}" not in index and len(index) == 3

    with wiki.api() as api:
        question = "What does band B3 earn in euros?"
        assert f"HR/{salary}" in _shown(api, question, "alice@contoso.com", ["hr"])
        assert f"HR/{salary}" not in _shown(api, question, "carol@contoso.com", [])

        # Only who may read it changes: no new version, no re-embedding, new readers.
        confluence.restrict_page(salary, users=["carol@contoso.com"])
        summary = wiki.sync()
        assert (summary["permissions"], summary["changed"], summary["embedded"]) == (1, 0, 0)
        assert wiki.readers()[f"HR/{salary}"] == {("user:carol@contoso.com",)}
        assert f"HR/{salary}" not in _shown(api, question, "alice@contoso.com", ["hr"])
        assert f"HR/{salary}" in _shown(api, question, "carol@contoso.com", [])

        # A restriction on a parent page narrows what its children may be read by.
        confluence.restrict_page(deploy, groups=["ops"])
        assert wiki.sync()["permissions"] == 2
        assert wiki.readers()[f"ENG/{new}"] == {("group:ops",)}
        assert f"ENG/{new}" not in _shown(api, "pressure alarm controller", "bob",
                                          ["engineering"])


def test_an_interrupted_listing_resumes_and_ends_with_the_exact_index(
    request: pytest.FixtureRequest,
) -> None:
    wiki = _wiki(request, "cloud", batch_size=2, attempts=3)
    confluence = wiki.emulator
    pages = [confluence.add_page("ENG" if i % 2 else "HR", f"Note {i}",
                                 f"<p>Note number {i} about pump {i}.</p>") for i in range(7)]
    # The second page of the CQL search fails on every try of this run.
    confluence.inject_search_fault(page=2, status=500, times=3)
    error = wiki.failed_sync()
    assert isinstance(error, TransientError)
    assert len(wiki.index()) == 2  # the first page was committed, with its cursor
    assert wiki.store.cursor("wiki")["since"]

    summary = wiki.sync()
    assert (summary["new"], summary["unchanged"]) == (5, 2), summary
    index = wiki.index()
    expected = {f"{'ENG' if i % 2 else 'HR'}/{page}": [f"Note number {i} about pump {i}."]
                for i, page in enumerate(pages)}
    assert index == expected
    assert len(list(wiki.client.collections.use(wiki.collection).iterator())) == 7


def test_throttling_with_retry_after_is_waited_out(wiki: Wiki) -> None:
    wiki.emulator.add_page("ENG", "Deploying telemetry", DEPLOY)
    wiki.emulator.inject(429, times=1, retry_after="1", path_contains="/content/search")
    assert wiki.sync()["new"] == 1
    throttled, retried = wiki.emulator.requests_to("/content/search")[:2]
    assert retried.at - throttled.at >= 0.95


def test_a_bad_token_fails_in_one_clear_line_and_leaves_the_index_untouched(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    wiki = _wiki(request, "datacenter", username="robot")
    wiki.emulator.add_page("ENG", "Deploying telemetry", DEPLOY)
    wiki.sync()
    before = wiki.index()
    wiki.emulator.edit_page(next(iter(wiki.emulator.content)), "<p>changed</p>")
    monkeypatch.setenv("WIKI_TOKEN", "not-the-token")
    error = wiki.failed_sync()
    assert isinstance(error, SourceError)
    assert error.user_message == "source 'wiki': Confluence refused the credentials for robot"
    assert wiki.index() == before


def test_a_missing_space_is_named_in_the_connection_test(wiki: Wiki) -> None:
    from connectors import open_connector
    from headwater.config import source_config

    config = source_config(wiki.config, "wiki")
    assert open_connector(config).test_connection().ok
    config.params["spaces"] = ["ENG", "GONE"]
    check = open_connector(config).test_connection()
    assert (check.ok, check.message) == (
        False, f"space GONE does not exist or is not visible to {wiki.emulator.user}")


def test_an_unreachable_confluence_is_named_in_one_line(wiki: Wiki) -> None:
    from connectors import open_connector
    from headwater.config import source_config

    config = source_config(wiki.config, "wiki")
    wiki.emulator.stop()
    check = open_connector(config).test_connection()
    assert (check.ok, check.message) == (
        False, f"Confluence at {config.params['url']} cannot be reached")


@pytest.mark.parametrize(("storage", "text"), [
    ("<p>Plain <strong>bold</strong> and <em>italic</em>&nbsp;text.</p>",
     "Plain bold and italic text."),
    ("<h1>Title</h1><h3>Sub</h3><p>Body</p>", "# Title\n\n### Sub\n\nBody"),
    ("<ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul>",
     "- one\n- two\n  - nested"),
    ("<ol><li><p>first</p></li><li>second</li></ol>", "1. first\n2. second"),
    ("<table><tbody><tr><th>Name</th><th>Band</th></tr><tr><td>Ann</td><td><p>B3</p></td></tr>"
     "</tbody></table>", "| Name | Band |\n| Ann | B3 |"),
    ('<ac:structured-macro ac:name="code"><ac:parameter ac:name="language">python'
     '</ac:parameter><ac:plain-text-body><![CDATA[if x < 1:\n    print("<b>")]]>'
     "</ac:plain-text-body></ac:structured-macro>",
     '```python\nif x < 1:\n    print("<b>")\n```'),
    ('<p>State: <ac:structured-macro ac:name="status"><ac:parameter ac:name="colour">Green'
     '</ac:parameter><ac:parameter ac:name="title">DONE</ac:parameter>'
     "</ac:structured-macro></p>", "State: DONE"),
    ('<ac:layout><ac:layout-section ac:type="two_equal"><ac:layout-cell><p>left</p>'
     "</ac:layout-cell><ac:layout-cell><p>right</p></ac:layout-cell></ac:layout-section>"
     "</ac:layout>", "left\n\nright"),
    ('<ac:structured-macro ac:name="info"><ac:parameter ac:name="title">Heads up'
     '</ac:parameter><ac:rich-text-body><p>Read this.</p></ac:rich-text-body>'
     "</ac:structured-macro>", "Heads up\n\nRead this."),
    ('<p>See <ac:link><ri:page ri:content-title="Pump manual" /></ac:link> and '
     '<ac:link><ri:page ri:content-title="X" /><ac:plain-text-link-body><![CDATA[the FAQ]]>'
     "</ac:plain-text-link-body></ac:link>.</p>", "See Pump manual and the FAQ."),
    ('<ac:structured-macro ac:name="toc"><ac:parameter ac:name="maxLevel">2</ac:parameter>'
     '</ac:structured-macro><p>line one<br />line two</p><ac:image><ri:attachment '
     'ri:filename="a.png" /></ac:image>', "line one\nline two"),
    ("<ac:task-list><ac:task><ac:task-id>1</ac:task-id><ac:task-status>complete"
     "</ac:task-status><ac:task-body>ship it</ac:task-body></ac:task></ac:task-list>",
     "- [x] ship it"),
])
def test_storage_format_becomes_structured_text(storage: str, text: str) -> None:
    assert storage_to_markdown(storage) == text
