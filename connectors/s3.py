"""An S3 source (AWS or any S3-compatible store): objects under a prefix, versioned by ETag."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from connectors.base import (
    Change,
    ChangeKind,
    ChangePage,
    ConnectionCheck,
    Cursor,
    listing_pages,
)
from headwater.config import SourceConfig
from headwater.errors import HeadwaterError, SourceError, TransientError
from headwater.records import SourceDocument
from headwater.state import KnownDocument
from tasks.parse import DocumentRejected, mime_for

# What an S3 error code means for a sync: retry it, or tell a person what to fix.
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttling", "ThrottlingException", "503", "500"}
EXPLAINED_CODES = {
    "NoSuchBucket": "bucket {bucket} does not exist",
    "AccessDenied": "the credentials may not read bucket {bucket}",
    "403": "the credentials may not read bucket {bucket}",
    "InvalidAccessKeyId": "the access key id is not known to the S3 endpoint",
    "SignatureDoesNotMatch": "the secret access key is wrong",
    "404": "bucket {bucket} does not exist",
}


class S3Connector:
    """Lists a bucket prefix page by page; deletions are found by listing difference."""

    def __init__(self, config: SourceConfig, client: Any = None) -> None:
        self.name = config.name
        self.config = config
        params = config.params
        self.bucket: str = params["bucket"]
        self.prefix: str = params.get("prefix", "")
        self.page_size = config.batch_size
        self.client = client or boto3.client(
            "s3",
            endpoint_url=params.get("endpoint_url"),
            region_name=params.get("region", "us-east-1"),
            aws_access_key_id=(config.secret("access_key_id").get_secret_value()
                               if "access_key_id" in params else None),
            aws_secret_access_key=(config.secret("secret_access_key").get_secret_value()
                                   if "secret_access_key" in params else None),
            # botocore backs off with jitter on throttling (503 SlowDown) and honours a cap.
            config=Config(retries={"max_attempts": 8, "mode": "standard"},
                          connect_timeout=10, read_timeout=60),
        )

    def _describe(self, error: Exception) -> tuple[str, bool]:
        """One line a person can act on, and whether retrying may cure it."""
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in TRANSIENT_CODES:
                return f"S3 is throttling or unavailable ({code})", True
            message = EXPLAINED_CODES.get(code, "S3 refused the request ({code})")
            return message.format(bucket=self.bucket, code=code), False
        if isinstance(error, EndpointConnectionError):
            return "the S3 endpoint cannot be reached", True
        return f"S3 failed: {type(error).__name__}", False

    def _explain(self, error: Exception) -> HeadwaterError:
        message, transient = self._describe(error)
        kind = TransientError if transient else SourceError
        return kind(f"source {self.name!r}: {message}", str(error))

    def test_connection(self) -> ConnectionCheck:
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as error:
            return ConnectionCheck(False, self._describe(error)[0])
        return ConnectionCheck(True, f"bucket {self.bucket} is readable")

    def _relative(self, key: str) -> str:
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        yield from listing_pages(self._listing(known), known, self.page_size)

    def _listing(
        self, known: Mapping[str, KnownDocument]
    ) -> Iterator[tuple[str, Change | None]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for listing in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix,
                                              PaginationConfig={"PageSize": 1000}):
                for obj in listing.get("Contents", []):
                    if not obj["Key"].endswith("/"):  # a folder marker is not a document
                        yield obj["Key"], self._compare(obj, known.get(obj["Key"]))
        except (ClientError, BotoCoreError) as error:
            raise self._explain(error) from error

    def _compare(self, obj: dict[str, Any], known: KnownDocument | None) -> Change | None:
        key = obj["Key"]
        version = str(obj["ETag"]).strip('"')
        fingerprint = f"{obj['Size']}:{obj['LastModified'].isoformat()}"
        principals = tuple(self.config.principals_for(self._relative(key)))
        if known is None or known.quarantined:
            return Change(key, ChangeKind.ADDED, version, fingerprint, principals)
        if known.version != version:
            return Change(key, ChangeKind.MODIFIED, version, fingerprint, principals)
        if sorted(known.principals) != list(principals):
            return Change(key, ChangeKind.PERMISSIONS, version, fingerprint, principals)
        return None

    def fetch(self, change: Change) -> SourceDocument:
        size = int((change.fingerprint or "0:").split(":", 1)[0] or 0)
        if size > self.config.max_bytes:
            raise DocumentRejected(
                "fetch", f"file too large: {size / 1e6:.1f} MB is over the "
                         f"{self.config.max_bytes / 1e6:.1f} MB limit")
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=change.doc_id)
            content = obj["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise DocumentRejected("fetch", "object disappeared during the sync") from error
            raise self._explain(error) from error
        relative = self._relative(change.doc_id)
        endpoint = self.client.meta.endpoint_url.rstrip("/")
        return SourceDocument(
            source=self.name,
            doc_id=change.doc_id,
            title=relative.rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("-", " ").strip()
            or relative,
            url=f"{endpoint}/{self.bucket}/{change.doc_id}",
            mime_type=mime_for(change.doc_id),
            content=content,
            modified=obj.get("LastModified"),
            version=change.version or str(obj.get("ETag", "")).strip('"'),
            principals=list(change.principals),
            metadata={"bucket": self.bucket, "key": change.doc_id},
        )
