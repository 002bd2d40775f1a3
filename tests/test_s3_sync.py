"""An S3 source synced through `sync_source` into the real Weaviate, from moto's S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlencode

import boto3
import jwt
import pytest
import requests
import yaml
from conftest import free_port, indexed_texts
from fastapi.testclient import TestClient

from connectors.s3 import principals_in_tag
from flows.sync import sync_source
from headwater.api import create_app
from headwater.errors import SourceError, TransientError
from headwater.settings import Settings, get_settings
from headwater.state import StateStore
from tests.emulators.s3_faults import S3FaultProxy

HEADWATER = str(Path(sys.executable).parent / "headwater")
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
SECRET = "test-signing-secret-of-enough-length"


class BucketSource:
    """A bucket, the sources file that names it as source "wiki", a state DB and a collection."""

    def __init__(self, tmp_path: Path, s3, bucket: str, endpoint: str) -> None:
        self.s3, self.bucket, self.endpoint = s3, bucket, endpoint
        self.config = tmp_path / "headwater.yaml"
        self.state_db = f"sqlite:///{tmp_path / 'state.db'}"
        self.store = StateStore(self.state_db)
        self.configure()

    def configure(self, endpoint: str | None = None, params: dict | None = None,
                  **overrides: object) -> None:
        """Write the sources file: `params` are added to the bucket's, `overrides` to the
        source's (batch_size, throttling)."""
        params = {"bucket": self.bucket, "prefix": "kb/",
                  "endpoint_url": endpoint or self.endpoint,
                  "access_key_id": {"env": "WIKI_S3_KEY"},
                  "secret_access_key": {"env": "WIKI_S3_SECRET"}, **(params or {})}
        self.config.write_text(yaml.safe_dump({"sources": [{
            "name": "wiki", "type": "s3", "params": params,
            "principals": {"": ["group:staff"], "finance/": ["group:finance"]},
            **overrides,
        }]}))


@pytest.fixture
def bucket(tmp_path, collection, weaviate_client, monkeypatch,
           s3_endpoint) -> Iterator[BucketSource]:
    """A fresh bucket in the session's moto S3, synced as source "wiki" into this test's
    collection."""
    name = f"wiki-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=name)
    source = BucketSource(tmp_path, s3, name, s3_endpoint)
    for key, value in {"HEADWATER_CONFIG": str(source.config),
                       "HEADWATER_STATE_DB_URL": source.state_db,
                       "HEADWATER_COLLECTION": collection, "WIKI_S3_KEY": "test",
                       "WIKI_S3_SECRET": "test"}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield source
    get_settings.cache_clear()


@pytest.fixture
def bucket_source(bucket: BucketSource):
    return bucket.s3, bucket.bucket, bucket.config, bucket.store


@pytest.fixture
def proxy(s3_endpoint) -> Iterator[S3FaultProxy]:
    """The fault-injecting proxy in front of the session's moto S3 server."""
    with S3FaultProxy(s3_endpoint) as running:
        yield running




def test_objects_are_indexed_changed_and_deleted_like_files(
    bucket_source, weaviate_client, collection
) -> None:
    s3, bucket, _, _ = bucket_source
    s3.put_object(Bucket=bucket, Key="kb/vpn.md", Body=b"# VPN\n\nUse the corporate client.")
    s3.put_object(Bucket=bucket, Key="kb/finance/budget.csv", Body=b"team,eur\nops,100\n")
    s3.put_object(Bucket=bucket, Key="elsewhere/ignored.md", Body=b"# Not under the prefix")
    summary = sync_source("wiki")
    assert summary["new"] == 2
    index = indexed_texts(weaviate_client, collection)
    assert sorted(index) == ["kb/finance/budget.csv", "kb/vpn.md"]

    s3.put_object(Bucket=bucket, Key="kb/vpn.md", Body=b"# VPN\n\nUse the new client.")
    s3.delete_object(Bucket=bucket, Key="kb/finance/budget.csv")
    summary = sync_source("wiki")
    assert (summary["changed"], summary["deleted"]) == (1, 1)
    assert indexed_texts(weaviate_client, collection) == {
        "kb/vpn.md": ["VPN\n\nUse the new client."]}
    assert sync_source("wiki")["embedded"] == 0


def test_a_missing_bucket_fails_the_sync_in_one_clear_line(
    bucket_source, weaviate_client, collection
) -> None:
    _, bucket, config, _ = bucket_source
    config.write_text(config.read_text().replace(bucket, "no-such-bucket"))
    state = sync_source("wiki", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, SourceError)
    assert error.user_message == "source 'wiki': bucket no-such-bucket does not exist"
    # It stopped before touching the index: the collection was not even created.
    assert not weaviate_client.collections.exists(collection)


def test_sources_test_names_the_problem_in_one_line(bucket_source) -> None:
    _, bucket, config, _ = bucket_source
    headwater = HEADWATER
    ok = subprocess.run([headwater, "sources", "test", "wiki"], capture_output=True, text=True,
                        env=dict(os.environ))
    assert ok.returncode == 0 and ok.stdout.strip() == f"wiki: ok: bucket {bucket} is readable"
    config.write_text(config.read_text().replace(bucket, "no-such-bucket"))
    broken = subprocess.run([headwater, "sources", "test", "wiki"], capture_output=True,
                            text=True, env=dict(os.environ))
    assert broken.returncode == 1
    assert broken.stdout.strip() == "wiki: FAILED: bucket no-such-bucket does not exist"
    listed = subprocess.run([headwater, "sources", "list"], capture_output=True, text=True,
                            env=dict(os.environ))
    assert listed.stdout.split()[:3] == ["wiki", "s3", "manual"]


# -- readers from object tags ------------------------------------------------------------------


def _token(sub: str, groups: list[str]) -> str:
    claims = {"sub": sub, "groups": groups, "roles": ["user"], "aud": "headwater",
              "exp": int(time.time()) + 300}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def _shown(api: TestClient, question: str, who: tuple[str, list[str]]) -> set[str]:
    """The documents a user is shown as sources of the answer to `question`."""
    answer = api.post("/v1/query", json={"question": question, "top_k": 10},
                      headers={"Authorization": f"Bearer {_token(*who)}"})
    assert answer.status_code == 200, answer.text
    return {s["doc_id"] for s in answer.json()["sources"]}


def _tag(bucket: BucketSource, key: str, readers: str) -> None:
    bucket.s3.put_object_tagging(Bucket=bucket.bucket, Key=key, Tagging={
        "TagSet": [{"Key": "team", "Value": "people"}, {"Key": "readers", "Value": readers}]})


def test_a_reader_change_by_object_tag_reaches_the_index_without_reembedding(
    bucket: BucketSource, weaviate_client, collection
) -> None:
    salary, vpn = "kb/salary-bands.md", "kb/vpn.md"
    bucket.configure(params={"principals_tag": "readers"})
    bucket.s3.put_object(Bucket=bucket.bucket, Key=salary,
                         Body=b"# Salary bands\n\nBand B3 earns between 61,000 and 75,000 euros.",
                         Tagging=urlencode({"readers": "group:hr user:bob@corp.com"},
                                           quote_via=quote))
    bucket.s3.put_object(Bucket=bucket.bucket, Key=vpn,
                         Body=b"# VPN\n\nUse the corporate client to reach the intranet.")
    assert sync_source("wiki")["new"] == 2
    readers = {d: k.principals for d, k in bucket.store.known_documents("wiki").items()}
    # An untagged object keeps the configured readers of its prefix.
    assert readers == {salary: ["group:hr", "user:bob@corp.com"], vpn: ["group:staff"]}

    alice, erin = ("alice@corp.com", ["hr"]), ("erin@corp.com", ["engineering", "staff"])
    question = "What does salary band B3 earn?"
    settings = Settings(collection=collection, state_db_url=bucket.state_db, jwt_secret=SECRET)
    with TestClient(create_app(settings)) as api:
        assert salary in _shown(api, question, alice)
        assert salary not in _shown(api, question, erin)

        _tag(bucket, salary, "group:engineering  user:alice@corp.com")
        summary = sync_source("wiki")
        assert (summary["permissions"], summary["embedded"]) == (1, 0), summary
        assert (summary["new"], summary["changed"], summary["unchanged"]) == (0, 0, 1)
        assert salary in _shown(api, question, erin)  # by group
        assert salary in _shown(api, question, alice)  # by name, no longer by group

        _tag(bucket, salary, "group:engineering")
        assert sync_source("wiki")["permissions"] == 1
        assert salary not in _shown(api, question, alice)
        assert salary not in _shown(api, question, ("bob@corp.com", ["hr"]))
    chunks = weaviate_client.collections.use(collection).query.fetch_objects(
        limit=10).objects
    assert {o.properties["doc_id"]: sorted(o.properties["principals"]) for o in chunks} == {
        salary: ["group:engineering"], vpn: ["group:staff"]}
    assert sync_source("wiki")["permissions"] == 0  # the tags are read, nothing moved


def test_tag_values_name_readers_separated_by_spaces_or_commas() -> None:
    # AWS allows no comma in a tag value; other S3-compatible stores do.
    assert principals_in_tag(" group:hr  user:bob@corp.com,group:it, ") == (
        "group:hr", "group:it", "user:bob@corp.com")
    assert principals_in_tag("") == ()


# -- resuming, throttling, credentials ---------------------------------------------------------


def test_a_sync_interrupted_mid_listing_resumes_to_the_exact_index(
    bucket: BucketSource, proxy: S3FaultProxy, weaviate_client, collection
) -> None:
    run = uuid.uuid4().hex[:8]
    for i in range(7):
        bucket.s3.put_object(Bucket=bucket.bucket, Key=f"kb/note-{i}.md",
                             Body=f"# Note {i}\n\nNote number {i} of run {run}.".encode())
    # Two objects per listing request and per batch; throttling gives up after two quick tries.
    bucket.configure(proxy.url, batch_size=2, params={"list_page_size": 2},
                     throttling={"attempts": 2, "base_s": 0.05, "cap_s": 0.1})
    # The second page's request passes; from the third on, the listing fails as S3 down would.
    proxy.inject(200, times=1, path_contains="continuation-token")
    proxy.inject(503, times=100, path_contains="continuation-token")
    state = sync_source("wiki", return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, TransientError) and "\n" not in error.user_message
    assert error.user_message == (
        "source 'wiki': S3 is still throttling or unavailable after 2 tries")
    committed = [f"kb/note-{i}.md" for i in range(4)]
    assert sorted(bucket.store.known_documents("wiki")) == committed
    assert sorted(indexed_texts(weaviate_client, collection)) == committed

    proxy.faults.clear()
    summary = sync_source("wiki")
    assert (summary["new"], summary["unchanged"], summary["embedded"]) == (3, 4, 3), summary
    objects = list(weaviate_client.collections.use(collection).iterator())
    doc_ids = sorted(o.properties["doc_id"] for o in objects)
    assert doc_ids == [f"kb/note-{i}.md" for i in range(7)]  # each once: one chunk per note
    assert sorted(bucket.store.known_documents("wiki")) == doc_ids


def test_injected_throttling_is_waited_out_as_the_server_asks(
    bucket: BucketSource, proxy: S3FaultProxy, weaviate_client, collection
) -> None:
    bucket.s3.put_object(Bucket=bucket.bucket, Key="kb/vpn.md", Body=b"# VPN\n\nUse the client.")
    bucket.s3.put_object(Bucket=bucket.bucket, Key="kb/leave.md", Body=b"# Leave\n\n25 days.")
    bucket.configure(proxy.url)
    proxy.inject(503, times=1, retry_after="1")  # the first request: the connection test
    proxy.inject(503, times=1, retry_after="1", path_contains="/kb/vpn.md")  # its GetObject
    summary = sync_source("wiki")
    assert summary["new"] == 2
    assert sorted(indexed_texts(weaviate_client, collection)) == ["kb/leave.md", "kb/vpn.md"]
    first, again = proxy.requests[:2]
    assert (first.path, first.query) == (again.path, again.query)
    assert again.at - first.at >= 0.95
    throttled, retried = proxy.requests_to("/kb/vpn.md")
    assert retried.at - throttled.at >= 0.95
    # Every wait was the shared Backoff's: botocore sent each request as a single attempt.
    assert {r.headers["amz-sdk-request"] for r in proxy.requests} == {"attempt=1; max=1"}


@pytest.fixture
def iam_s3() -> Iterator[dict[str, str]]:
    """A private moto S3 that checks every request's SigV4 signature against its IAM: the
    first four requests (a user, its access key, its policy, a bucket) are let through
    unsigned, as `INITIAL_NO_AUTH_ACTION_COUNT` allows."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"moto_server did not start on {endpoint}:\n"
                                f"{server.communicate()[0]}", pytrace=False)
                time.sleep(0.1)
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1",
                 "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="headwater")
        key = iam.create_access_key(UserName="headwater")["AccessKey"]
        iam.put_user_policy(UserName="headwater", PolicyName="read-wiki", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **setup).create_bucket(Bucket="wiki-private")
        yield {"endpoint": endpoint, "bucket": "wiki-private", "key_id": key["AccessKeyId"],
               "secret": key["SecretAccessKey"]}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_bad_credential_fails_in_one_line_and_leaves_the_index_alone(
    bucket: BucketSource, iam_s3: dict[str, str], weaviate_client, collection, monkeypatch
) -> None:
    signed = boto3.client("s3", endpoint_url=iam_s3["endpoint"], region_name="us-east-1",
                          aws_access_key_id=iam_s3["key_id"],
                          aws_secret_access_key=iam_s3["secret"])
    bucket.bucket = iam_s3["bucket"]
    bucket.configure(iam_s3["endpoint"])
    for key in ("kb/vpn.md", "kb/leave.md"):
        signed.put_object(Bucket=iam_s3["bucket"], Key=key, Body=f"# {key}\n\nText.".encode())

    def sources_test() -> subprocess.CompletedProcess:
        return subprocess.run([HEADWATER, "sources", "test", "wiki"], capture_output=True,
                              text=True, env=dict(os.environ), timeout=120)

    monkeypatch.setenv("WIKI_S3_KEY", iam_s3["key_id"])
    monkeypatch.setenv("WIKI_S3_SECRET", "not-the-secret")
    state = sync_source("wiki", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, SourceError)
    assert error.user_message == "source 'wiki': the secret access key is wrong"
    assert not weaviate_client.collections.exists(collection)
    checked = sources_test()
    assert checked.returncode == 1
    assert checked.stdout.strip() == "wiki: FAILED: the secret access key is wrong"

    monkeypatch.setenv("WIKI_S3_KEY", "AKIAIOSFODNN7NOTKNOWN")
    checked = sources_test()
    assert checked.stdout.strip() == (
        "wiki: FAILED: the access key id is not known to the S3 endpoint")

    monkeypatch.setenv("WIKI_S3_KEY", iam_s3["key_id"])
    monkeypatch.setenv("WIKI_S3_SECRET", iam_s3["secret"])
    assert sync_source("wiki")["new"] == 2
    indexed = indexed_texts(weaviate_client, collection)
    assert sorted(indexed) == ["kb/leave.md", "kb/vpn.md"]

    signed.delete_object(Bucket=iam_s3["bucket"], Key="kb/leave.md")
    monkeypatch.setenv("WIKI_S3_SECRET", "not-the-secret")
    state = sync_source("wiki", return_state=True)
    assert state.is_failed()
    assert state.result(raise_on_failure=False).user_message == (
        "source 'wiki': the secret access key is wrong")
    assert indexed_texts(weaviate_client, collection) == indexed
