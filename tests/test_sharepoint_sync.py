"""A SharePoint Online site synced through `sync_source` into the real Weaviate, from an emulator
that the real office365 client library talks to over HTTP."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import yaml
from fastapi.testclient import TestClient

from flows.sync import sync_source
from headwater.api import create_app
from headwater.errors import SourceError
from headwater.settings import Settings, get_settings
from headwater.state import StateStore
from tests.emulators.sharepoint import SharePointEmulator

SIGNING_SECRET = "test-signing-secret-of-enough-length"
STAFF, HR = ("sam", ["staff"]), ("harriet", ["staff", "hr"])


class Site:
    """An emulated site, a sources file naming it, a state DB and a collection of one test."""

    def __init__(self, root: Path, collection: str, client, monkeypatch: pytest.MonkeyPatch,
                 emulator: SharePointEmulator) -> None:
        self.root, self.collection, self.client = root, collection, client
        self.sp, self.monkeypatch = emulator, monkeypatch
        self.config = root / "headwater.yaml"
        self.state_db = f"sqlite:///{root / 'state.db'}"
        for key, value in {"HEADWATER_CONFIG": str(self.config),
                           "HEADWATER_STATE_DB_URL": self.state_db,
                           "HEADWATER_COLLECTION": collection,
                           "INTRANET_SP_SECRET": emulator.client_secret}.items():
            monkeypatch.setenv(key, value)
        self.configure()
        self.store = StateStore(self.state_db)

    def configure(self, batch_size: int = 32, **auth: object) -> None:
        params = {"site_url": f"{self.sp.url}{self.sp.site}", "authority": self.sp.url,
                  "include_pages": True,
                  **(auth or {"tenant": self.sp.tenant, "client_id": self.sp.client_id,
                              "client_secret": {"env": "INTRANET_SP_SECRET"}})}
        self.config.write_text(yaml.safe_dump({"sources": [{
            "name": "intranet", "type": "sharepoint", "batch_size": batch_size,
            "throttling": {"attempts": 3, "base_s": 0.05}, "params": params}]}))
        get_settings.cache_clear()

    def sync(self) -> dict:
        state = sync_source("intranet", return_state=True)
        assert state.is_completed(), state
        return state.result()

    def doc_id(self, path: str, library: str | None = None) -> str:
        return self.sp._find(path, library)[1].unique_id

    def index(self) -> dict[str, tuple[str, tuple[str, ...], str]]:
        """doc id -> (url path, readers, text) as Weaviate holds them."""
        found: dict[str, list[tuple[int, str, str, tuple[str, ...]]]] = {}
        for obj in self.client.collections.use(self.collection).iterator():
            p = obj.properties
            found.setdefault(p["doc_id"], []).append(
                (p["ordinal"], p["text"], p["url"], tuple(sorted(p["principals"]))))
        return {doc: (chunks[0][2].split(self.sp.url, 1)[-1], chunks[0][3],
                      " ".join(t for _, t, _, _ in sorted(chunks)))
                for doc, chunks in found.items()}

    def expected(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """doc id -> (url path, readers), worked out from the emulator's own model."""
        result = {}
        for lib in self.sp.libraries.values():
            for item in lib.items.values():
                if item.folder:
                    continue
                readers, parent = item.readers, item.url
                while readers is None and parent != lib.root:
                    parent = parent.rsplit("/", 1)[0]
                    folder = self.sp._by_url(parent)
                    readers = folder[1].readers if folder else None
                readers = readers if readers is not None else lib.readers
                readers = readers if readers is not None else self.sp.site_readers
                result[item.unique_id] = (item.url, tuple(sorted(
                    r.replace("aad:", "group:") for r in readers)))
        return result

    def assert_exact(self) -> None:
        held = {doc: (url, readers) for doc, (url, readers, _) in self.index().items()}
        assert held == self.expected()

    def readable(self, who: tuple[str, list[str]], question: str) -> set[str]:
        """The doc ids the query API cites to this caller for a question."""
        settings = Settings(collection=self.collection, state_db_url=self.state_db,
                            jwt_secret=SIGNING_SECRET)
        token = jwt.encode({"sub": who[0], "groups": who[1], "roles": ["user"],
                            "aud": "headwater", "exp": int(time.time()) + 300},
                           SIGNING_SECRET, algorithm="HS256")
        with TestClient(create_app(settings)) as api:
            answer = api.post("/v1/query", json={"question": question, "top_k": 10},
                              headers={"Authorization": f"Bearer {token}"}).json()
        assert "sources" in answer, answer
        return {s["doc_id"] for s in answer["sources"]}


@pytest.fixture
def site(tmp_path, collection, weaviate_client, monkeypatch) -> Iterator[Site]:
    with SharePointEmulator() as emulator:
        emulator.add_library("Policies")
        yield Site(tmp_path, collection, weaviate_client, monkeypatch, emulator)
    get_settings.cache_clear()


def _handbook(sp: SharePointEmulator) -> None:
    """Two libraries, a nested folder whose readers are HR only, and a site page."""
    sp.add_file("Documents", "welcome.md", b"# Welcome\n\nThe handbook starts with coffee.")
    sp.add_file("Documents", "hr/pay.md", b"# Pay\n\nThe handbook says bands move in March.")
    sp.add_file("Documents", "hr/reviews/2024.md",
                b"# Reviews\n\nThe handbook review cycle ends in May.")
    sp.set_readers("hr", ["group:hr", "user:hr-lead@contoso.com"])
    sp.add_file("Policies", "travel.txt", b"The handbook travel policy: trains under 6 hours.")
    sp.add_page("Home", "<div><h2>Intranet</h2><p>The handbook home page.</p></div>",
                title="Intranet home")


def test_a_full_sync_indexes_two_libraries_a_nested_folder_and_a_page(site: Site) -> None:
    _handbook(site.sp)
    summary = site.sync()
    assert (summary["new"], summary["deleted"]) == (5, 0)
    site.assert_exact()
    index = site.index()
    assert index[site.doc_id("hr/reviews/2024.md")][1] == ("group:hr",
                                                           "user:hr-lead@contoso.com")
    assert "The handbook home page." in index[site.doc_id("Home.aspx")][2]
    assert index[site.doc_id("travel.txt")][1] == ("group:staff",)

    hr_docs = {site.doc_id("hr/pay.md"), site.doc_id("hr/reviews/2024.md")}
    assert hr_docs <= site.readable(HR, "what does the handbook say")
    assert not hr_docs & site.readable(STAFF, "what does the handbook say")
    # Nothing changed: the change log is read and nothing is fetched or embedded.
    downloads = len(site.sp.requests_to("$value"))
    again = site.sync()
    assert (again["new"], again["changed"], again["embedded"]) == (0, 0, 0)
    assert len(site.sp.requests_to("$value")) == downloads


def test_edits_additions_deletions_and_moves_reach_the_index_and_the_answers(site: Site) -> None:
    _handbook(site.sp)
    site.sync()
    site.sp.edit_file("welcome.md", b"# Welcome\n\nThe handbook starts with tea now.")
    site.sp.add_file("Policies", "expenses.md", b"# Expenses\n\nThe handbook caps hotels.")
    site.sp.delete_file("travel.txt")
    # Moved out of the HR folder: same document, new place, and so new readers.
    site.sp.move_file("hr/pay.md", "pay.md")
    site.sp.edit_page("Home", "<div><p>The handbook home page, redesigned.</p></div>")

    summary = site.sync()
    assert (summary["new"], summary["changed"], summary["deleted"]) == (1, 3, 1)
    site.assert_exact()
    index = site.index()
    assert "tea now" in index[site.doc_id("welcome.md")][2]
    assert "redesigned" in index[site.doc_id("Home.aspx")][2]
    pay = site.doc_id("pay.md")
    assert index[pay][0].endswith("/Shared Documents/pay.md")
    assert pay in site.readable(STAFF, "when do pay bands move in the handbook")
    assert site.doc_id("expenses.md") in site.readable(STAFF, "handbook hotels expenses")


def test_a_permission_change_updates_readers_without_embedding(site: Site) -> None:
    _handbook(site.sp)
    site.sync()
    welcome = site.doc_id("welcome.md")
    assert welcome in site.readable(STAFF, "handbook coffee")
    site.sp.set_readers("welcome.md", ["group:hr"])

    summary = site.sync()
    assert (summary["permissions"], summary["embedded"], summary["changed"]) == (1, 0, 0)
    site.assert_exact()
    assert welcome not in site.readable(STAFF, "handbook coffee")
    assert welcome in site.readable(HR, "handbook coffee")
    # An Entra ID security group granted on a whole folder reaches every file that inherits.
    site.sp.set_readers("hr/reviews", ["aad:Review Board"])
    summary = site.sync()
    assert (summary["permissions"], summary["embedded"]) == (1, 0)
    assert site.index()[site.doc_id("hr/reviews/2024.md")][1] == ("group:Review Board",)


def test_readers_granted_on_the_site_or_a_library_reach_the_index_without_a_full_sync(
        site: Site) -> None:
    _handbook(site.sp)
    site.sync()
    travel, welcome = site.doc_id("travel.txt"), site.doc_id("welcome.md")
    downloads = len(site.sp.requests_to("$value"))
    # Not an item's change: the site's change log says it, no list's.
    site.sp.set_library_readers("Policies", ["group:legal"])
    summary = site.sync()
    assert (summary["permissions"], summary["embedded"], summary["changed"]) == (1, 0, 0)
    site.assert_exact()
    assert travel not in site.readable(STAFF, "handbook travel trains")

    # Granted on the site: everything inheriting from it follows; the HR folder (its own
    # readers) and the Policies library (now its own) do not.
    site.sp.set_site_readers(["group:staff", "group:contractors"])
    summary = site.sync()
    assert (summary["permissions"], summary["embedded"]) == (2, 0)  # welcome.md and Home
    site.assert_exact()
    assert welcome in site.readable(("casey", ["contractors"]), "handbook coffee")
    assert len(site.sp.requests_to("$value")) == downloads  # nothing was read again
    assert site.sync()["permissions"] == 0  # and the next run has nothing left to do


def test_a_sync_interrupted_mid_listing_resumes_and_ends_exact(site: Site) -> None:
    for n in range(5):
        site.sp.add_file("Documents", f"notes/n{n}.md", f"# Note {n}\n\nnumber {n}".encode())
    site.configure(batch_size=2)
    site.sp.fail_items_page(2, status=500, times=10)  # outlasts every retry
    state = sync_source("intranet", return_state=True)
    assert state.is_failed()
    # The first page (the folder and one file) was committed before the second page failed.
    committed = site.store.document_count("intranet")
    assert 0 < committed < 5

    site.sp.failing_pages.clear()
    summary = site.sync()
    assert summary["new"] == 5 - committed and summary["deleted"] == 0
    site.assert_exact()
    assert site.sync()["new"] == 0


def test_throttling_is_waited_out_as_the_server_asks(site: Site) -> None:
    _handbook(site.sp)
    site.sp.inject(429, times=1, retry_after="1", path_contains="/items")
    summary = site.sync()
    assert summary["new"] == 5
    listed = site.sp.requests_to("/items")
    assert listed[1].at - listed[0].at >= 0.95
    site.assert_exact()


def test_a_bad_client_secret_fails_in_one_line_and_leaves_the_index_alone(site: Site) -> None:
    _handbook(site.sp)
    site.sync()
    before = site.index()
    site.sp.edit_file("welcome.md", b"# Welcome\n\nchanged while the secret was wrong")
    site.monkeypatch.setenv("INTRANET_SP_SECRET", "wrong-secret")
    state = sync_source("intranet", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, SourceError)
    assert error.user_message == ("source 'intranet': SharePoint refused the app's credentials "
                                  "(AADSTS7000215: Invalid client secret provided)")
    assert site.index() == before


def test_an_expired_change_token_falls_back_and_still_ends_exact(site: Site) -> None:
    _handbook(site.sp)
    site.sync()
    site.sp.edit_file("welcome.md", b"# Welcome\n\nThe handbook starts at nine.")
    site.sp.delete_file("hr/reviews/2024.md")
    site.sp.set_readers("travel.txt", ["user:traveller@contoso.com"])
    site.sp.add_file("Policies", "leave.md", b"# Leave\n\nThe handbook grants 25 days.")
    site.sp.expire_change_log()

    summary = site.sync()
    assert (summary["new"], summary["changed"], summary["deleted"], summary["permissions"]) == (
        1, 1, 1, 1)
    site.assert_exact()
    assert "nine" in site.index()[site.doc_id("welcome.md")][2]
    # The fallback stored fresh tokens: the next change comes from the change log again.
    site.sp.edit_file("leave.md", b"# Leave\n\nThe handbook grants 26 days.")
    asked = len(site.sp.requests_to("getChanges"))
    assert site.sync()["changed"] == 1
    assert len(site.sp.requests_to("getChanges")) > asked
    site.assert_exact()


def test_a_certificate_login_signs_a_client_assertion(site: Site, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "headwater-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "app.pem").write_bytes(pem)
    site.sp.add_certificate(pem)
    site.monkeypatch.setenv("INTRANET_SP_KEY", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode())
    site.configure(tenant=site.sp.tenant, client_id=site.sp.client_id,
                   certificate_path=str(tmp_path / "app.pem"),
                   private_key={"env": "INTRANET_SP_KEY"})
    site.sp.add_file("Documents", "a.md", b"# A\n\nsigned in with a certificate")
    assert site.sync()["new"] == 1
    (login,) = site.sp.requests_to("/oauth2/v2.0/token")
    assert b"client_assertion=" in login.body and b"client_secret" not in login.body


def test_a_pre_issued_token_is_used_as_is(site: Site) -> None:
    site.monkeypatch.setenv("INTRANET_SP_TOKEN", site.sp.issue_token())
    site.configure(token={"env": "INTRANET_SP_TOKEN"})
    site.sp.add_file("Documents", "a.md", b"# A\n\nread with a pre-issued token")
    assert site.sync()["new"] == 1
    assert site.sp.requests_to("/oauth2/") == []
    site.monkeypatch.setenv("INTRANET_SP_TOKEN", "revoked")
    state = sync_source("intranet", return_state=True)
    error = state.result(raise_on_failure=False)
    assert error.user_message == "source 'intranet': SharePoint refused the app's credentials"
