"""An S3 source synced through `sync_source` into the real Weaviate, from moto's S3 server."""

from __future__ import annotations

import uuid

import boto3
import pytest
import yaml

from flows.sync import sync_source
from headwater.errors import SourceError
from headwater.settings import get_settings
from headwater.state import StateStore


@pytest.fixture
def bucket_source(tmp_path, collection, weaviate_client, monkeypatch, s3_endpoint):
    bucket = f"wiki-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket=bucket)
    config = tmp_path / "headwater.yaml"
    config.write_text(yaml.safe_dump({"sources": [{
        "name": "wiki", "type": "s3",
        "params": {"bucket": bucket, "prefix": "kb/", "endpoint_url": s3_endpoint,
                   "access_key_id": {"env": "WIKI_S3_KEY"},
                   "secret_access_key": {"env": "WIKI_S3_SECRET"}},
        "principals": {"": ["group:staff"], "finance/": ["group:finance"]},
    }]}))
    state_db = f"sqlite:///{tmp_path / 'state.db'}"
    for key, value in {"HEADWATER_CONFIG": str(config), "HEADWATER_STATE_DB_URL": state_db,
                       "HEADWATER_COLLECTION": collection, "WIKI_S3_KEY": "test",
                       "WIKI_S3_SECRET": "test"}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield s3, bucket, config, StateStore(state_db)
    get_settings.cache_clear()


def _index(client, collection: str) -> dict[str, list[str]]:
    found: dict[str, list[tuple[int, str]]] = {}
    for obj in client.collections.use(collection).iterator():
        found.setdefault(obj.properties["doc_id"], []).append(
            (obj.properties["ordinal"], obj.properties["text"]))
    return {d: [t for _, t in sorted(c)] for d, c in found.items()}


def test_objects_are_indexed_changed_and_deleted_like_files(
    bucket_source, weaviate_client, collection
) -> None:
    s3, bucket, _, _ = bucket_source
    s3.put_object(Bucket=bucket, Key="kb/vpn.md", Body=b"# VPN\n\nUse the corporate client.")
    s3.put_object(Bucket=bucket, Key="kb/finance/budget.csv", Body=b"team,eur\nops,100\n")
    s3.put_object(Bucket=bucket, Key="elsewhere/ignored.md", Body=b"# Not under the prefix")
    summary = sync_source("wiki")
    assert summary["new"] == 2
    index = _index(weaviate_client, collection)
    assert sorted(index) == ["kb/finance/budget.csv", "kb/vpn.md"]

    s3.put_object(Bucket=bucket, Key="kb/vpn.md", Body=b"# VPN\n\nUse the new client.")
    s3.delete_object(Bucket=bucket, Key="kb/finance/budget.csv")
    summary = sync_source("wiki")
    assert (summary["changed"], summary["deleted"]) == (1, 1)
    assert _index(weaviate_client, collection) == {"kb/vpn.md": ["VPN\n\nUse the new client."]}
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
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, bucket, config, _ = bucket_source
    headwater = str(Path(sys.executable).parent / "headwater")
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
