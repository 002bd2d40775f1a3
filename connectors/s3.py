"""An S3 source (AWS or any S3-compatible store): objects under a prefix, versioned by ETag."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from connectors.base import (
    Backoff,
    Change,
    ChangeKind,
    ChangePage,
    ConnectionCheck,
    Cursor,
    Retry,
    listing_pages,
    named_page,
    retry_after_seconds,
)
from headwater.config import ConfigError, SourceConfig
from headwater.errors import HeadwaterError, SourceError, TransientError
from headwater.records import SourceDocument
from headwater.state import KnownDocument
from tasks.parse import DocumentRejected, mime_for

T = TypeVar("T")

# What an S3 error means for a sync: wait and retry it, or tell a person what to fix.
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                   "Throttling", "ThrottlingException", "429", "500", "502", "503", "504"}
# A dropped connection, a timeout or a body cut short: the same request may well succeed.
NETWORK_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError)
EXPLAINED_CODES = {
    "NoSuchBucket": "bucket {bucket} does not exist",
    "404": "bucket {bucket} does not exist",
    "AccessDenied": "the credentials may not read bucket {bucket}",
    "403": "the credentials may not read bucket {bucket}",
    "AllAccessDisabled": "all access to bucket {bucket} is disabled",
    "InvalidAccessKeyId": "the access key id is not known to the S3 endpoint",
    "SignatureDoesNotMatch": "the secret access key is wrong",
    "InvalidToken": "the session token is malformed or not valid",
    "ExpiredToken": "the session token has expired",
    "RequestTimeTooSkewed": "this machine's clock is too far from the S3 endpoint's",
}
# Reading tags needs a permission of its own (s3:GetObjectTagging), often left out of policies.
TAGGING_CODES = {
    **EXPLAINED_CODES,
    "AccessDenied": "the credentials may not read object tags in bucket {bucket} "
                    "(s3:GetObjectTagging), which params.principals_tag needs",
    "403": "the credentials may not read object tags in bucket {bucket} "
           "(s3:GetObjectTagging), which params.principals_tag needs",
}
# An object deleted between the listing and the next request: not an error of the source.
GONE_CODES = {"NoSuchKey", "404"}
TAG_READERS = 8  # concurrent GetObjectTagging calls per listing page; under botocore's pool of 10
LIST_PAGE_KEYS = 1000  # S3's own maximum per ListObjectsV2 request
PRINCIPAL_SEPARATORS = re.compile(r"[\s,]+")


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def throttled(error: Exception) -> Retry | None:
    """Backoff's classifier: throttling, server hiccups and dropped connections are retried,
    after the server's Retry-After when it gives one."""
    if isinstance(error, NETWORK_ERRORS):
        return Retry()
    if not isinstance(error, ClientError):
        return None
    metadata = error.response.get("ResponseMetadata", {})
    if _code(error) not in TRANSIENT_CODES and (
            metadata.get("HTTPStatusCode") not in TRANSIENT_STATUSES):
        return None
    headers = {k.lower(): v for k, v in (metadata.get("HTTPHeaders") or {}).items()}
    return Retry(retry_after_seconds(headers.get("retry-after")))


def principals_in_tag(value: str) -> tuple[str, ...]:
    """Readers written in a tag value: "group:hr user:bob@corp.com" or "group:hr,group:it"."""
    return tuple(sorted({p for p in PRINCIPAL_SEPARATORS.split(value) if p}))


class S3Connector:
    """Lists a bucket prefix page by page; deletions are found by listing difference.

    Readers come from the source's configured per-prefix `principals`, or, with
    `params.principals_tag` set, from that object tag (principals separated by spaces, or by
    commas where the store allows them: AWS does not, and caps a value at 256 characters); an
    object without the tag falls back to the configured ones, one whose tag is empty is
    readable by nobody. A tag change moves neither the ETag nor LastModified, so with the tag
    every run costs one GetObjectTagging request per object under the prefix, unchanged ones
    included, made `TAG_READERS` at a time per listing page: about 1,000 objects take a few
    seconds and, on AWS, cost as much as 1,000 GETs.

    Every request goes through the shared `Backoff` (botocore's own retries are off), so
    throttling is waited out as the server asks and as the source's `throttling` allows.
    """

    def __init__(self, config: SourceConfig, client: Any = None,
                 backoff: Backoff | None = None) -> None:
        self.name = config.name
        self.config = config
        params = config.params
        if "bucket" not in params:
            raise ConfigError(f"source {config.name!r}: params.bucket is required")
        self.bucket: str = params["bucket"]
        self.prefix: str = params.get("prefix", "")
        self.principals_tag: str | None = params.get("principals_tag")
        self.page_size = config.batch_size
        self.list_page_keys = int(params.get("list_page_size", LIST_PAGE_KEYS))
        self.backoff = backoff or Backoff(**config.throttling.model_dump())
        self.client = client or boto3.client(
            "s3",
            endpoint_url=params.get("endpoint_url"),
            region_name=params.get("region", "us-east-1"),
            aws_access_key_id=(config.secret("access_key_id").get_secret_value()
                               if "access_key_id" in params else None),
            aws_secret_access_key=(config.secret("secret_access_key").get_secret_value()
                                   if "secret_access_key" in params else None),
            # One attempt per call: `Backoff` decides every wait, so a Retry-After is obeyed
            # and the source's throttling settings are the only ones in force. (botocore's
            # `max_attempts` counts retries after the first try, `total_max_attempts` all.)
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                          connect_timeout=10, read_timeout=60),
        )

    # -- errors ------------------------------------------------------------------------------

    def _describe(self, error: Exception,
                  explained: Mapping[str, str] = EXPLAINED_CODES) -> tuple[str, bool]:
        """One line a person can act on, and whether retrying may cure it."""
        if isinstance(error, ClientError):
            code = _code(error)
            if throttled(error) is not None:
                return f"S3 is throttling or unavailable ({code})", True
            message = explained.get(code, "S3 refused the request ({code})")
            return message.format(bucket=self.bucket, code=code), False
        if isinstance(error, NETWORK_ERRORS):
            return "the S3 endpoint cannot be reached", True
        return f"S3 failed: {type(error).__name__}", False

    def _explain(self, error: Exception,
                 explained: Mapping[str, str] = EXPLAINED_CODES) -> HeadwaterError:
        if isinstance(error, HeadwaterError):
            return error  # already one line that names the source (Backoff gave up)
        message, transient = self._describe(error, explained)
        kind = TransientError if transient else SourceError
        return kind(f"source {self.name!r}: {message}", str(error))

    def _call(self, operation: Callable[[], T],
              explained: Mapping[str, str] = EXPLAINED_CODES) -> T:
        """One request to S3, throttling waited out, any failure explained in one line."""
        try:
            return self.backoff.run(operation, throttled, f"source {self.name!r}: S3")
        except (ClientError, BotoCoreError, TransientError) as error:
            raise self._explain(error, explained) from error

    # -- the protocol ------------------------------------------------------------------------

    def test_connection(self) -> ConnectionCheck:
        try:
            self._call(lambda: self.client.list_objects_v2(Bucket=self.bucket,
                                                           Prefix=self.prefix, MaxKeys=1))
        except HeadwaterError as error:
            return ConnectionCheck(False, error.user_message.removeprefix(
                f"source {self.name!r}: "))
        return ConnectionCheck(True, f"bucket {self.bucket} is readable")

    def _relative(self, key: str) -> str:
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def list_changes(
        self, cursor: Cursor | None, known: Mapping[str, KnownDocument]
    ) -> Iterator[ChangePage]:
        # No cursor: deletions are found only by a complete listing, so every run lists the
        # prefix from its start; what an interrupted run committed comes back as unchanged.
        yield from listing_pages(self._listing(known), known, self.page_size)

    def _listing(
        self, known: Mapping[str, KnownDocument]
    ) -> Iterator[tuple[str, Change | None]]:
        request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix,
                                   "MaxKeys": self.list_page_keys}
        while True:
            listing = self._call(lambda: self.client.list_objects_v2(**request))
            # A folder marker is not a document.
            objects = [o for o in listing.get("Contents", []) if not o["Key"].endswith("/")]
            readers = self._readers_of([o["Key"] for o in objects])
            for obj in objects:
                yield obj["Key"], self._compare(obj, readers[obj["Key"]], known.get(obj["Key"]))
            if not listing.get("IsTruncated"):
                return
            request["ContinuationToken"] = listing["NextContinuationToken"]

    def changes_for(self, doc_ids: Iterable[str],
                    known: Mapping[str, KnownDocument]) -> ChangePage:
        """Each named key looked up with a one-key listing (not HEAD), so its ETag, size and
        LastModified are exactly what a full listing would compare."""
        keys = list(dict.fromkeys(doc_ids))
        found: dict[str, dict[str, Any]] = {}
        for key in keys:
            if not key.startswith(self.prefix) or key.endswith("/"):
                continue
            listing = self._call(lambda key=key: self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=key, MaxKeys=1))
            found.update({o["Key"]: o for o in listing.get("Contents", []) if o["Key"] == key})
        readers = self._readers_of(list(found))

        def look(key: str) -> tuple[bool, Change | None]:
            if key not in found:
                return False, None
            return True, self._compare(found[key], readers[key], known.get(key))

        return named_page(keys, known, look)

    def _readers_of(self, keys: list[str]) -> dict[str, tuple[str, ...]]:
        configured = {k: tuple(self.config.principals_for(self._relative(k))) for k in keys}
        if not self.principals_tag or not keys:
            return configured
        with ThreadPoolExecutor(max_workers=min(TAG_READERS, len(keys))) as pool:
            tagged = dict(zip(keys, pool.map(self._tagged_readers, keys), strict=True))
        return {k: configured[k] if tagged[k] is None else tagged[k] for k in keys}

    def _tagged_readers(self, key: str) -> tuple[str, ...] | None:
        """The readers the object's tag names, or None when it has no such tag."""

        def tags() -> list[dict[str, str]]:
            try:
                return self.client.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
            except ClientError as error:
                if _code(error) in GONE_CODES:
                    return []  # deleted since the listing; its fetch will say so
                raise

        for tag in self._call(tags, TAGGING_CODES):
            if tag["Key"] == self.principals_tag:
                return principals_in_tag(tag["Value"])
        return None

    def _compare(self, obj: dict[str, Any], principals: tuple[str, ...],
                 known: KnownDocument | None) -> Change | None:
        key = obj["Key"]
        version = str(obj["ETag"]).strip('"')
        fingerprint = f"{obj['Size']}:{obj['LastModified'].isoformat()}"
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

        def read() -> tuple[dict[str, Any], bytes] | None:
            # The body is read inside the retried call: a stream cut short is retried whole.
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=change.doc_id)
            except ClientError as error:
                if _code(error) in GONE_CODES:
                    return None
                raise
            return obj, obj["Body"].read()

        found = self._call(read)
        if found is None:
            raise DocumentRejected("fetch", "object disappeared during the sync")
        obj, content = found
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
