"""A thin layer over boto3's S3 client for the object-storage store: ``s3://`` URLs,
conditional writes, and errors turned into the store's own.

boto3 is an optional dependency (``pip install 'nnoculation[s3]'``), imported only when an S3
store is opened. The endpoint and credentials come from boto3's standard configuration
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``,
``~/.aws/config``, an instance role ...), so any S3-compatible server works.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from models.store_names import InvalidNameError, StoreError, StoreUnavailableError

SCHEME = "s3://"
# S3's rules for (general purpose) bucket names, minus the dotted forms that break TLS.
BUCKET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*$")
# The request failed because of its If-None-Match / If-Match condition (412), or (409) a
# concurrent conditional write to the same key was in flight (S3 asks the caller to retry).
CONDITION_FAILED = "PreconditionFailed"
CONDITION_CONFLICT = "ConditionalRequestConflict"
NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
CHUNK_BYTES = 1 << 20
# botocore's defaults (60 s connect and read timeouts, 5 attempts) can block a caller for
# minutes when the server hangs; these bound one call to about 3 x (3 + 10) s plus backoff.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 3


class ConditionFailedError(StoreError):
    """A conditional write or delete lost: the object exists (If-None-Match) or changed
    (If-Match)."""


class ConditionConflictError(ConditionFailedError):
    """409 ConditionalRequestConflict: another conditional write to the key was in flight;
    nothing was decided, so the caller may retry."""


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix``: a bucket and a key prefix (no leading or trailing '/')."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse and validate an ``s3://bucket[/prefix]`` URL; ``InvalidNameError`` if bad."""
        if not url.startswith(SCHEME):
            raise InvalidNameError(f"not an S3 URL: {url!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = url[len(SCHEME) :].partition("/")
        prefix = prefix.strip("/")
        if not BUCKET_PATTERN.match(bucket) or ".." in bucket:
            raise InvalidNameError(
                f"invalid bucket name {bucket!r} in {url!r}: 3-63 lower-case letters, digits, "
                "'.' and '-'"
            )
        for part in prefix.split("/") if prefix else []:
            if not PREFIX_PART.match(part):
                raise InvalidNameError(
                    f"invalid key prefix {prefix!r} in {url!r}: use letters, digits, '_', '.', "
                    "'-', '=' between '/', and no empty, '.' or '..' parts"
                )
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, *parts: str) -> str:
        """The object key of ``parts`` under the prefix."""
        return "/".join([self.prefix, *parts] if self.prefix else parts)


def require_boto3() -> None:
    """``StoreError`` with the install line when boto3 (optional) is missing."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        raise StoreError(
            "an s3:// model store needs boto3: pip install 'nnoculation[s3]'"
        ) from None


def make_client(
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    read_timeout_s: float = READ_TIMEOUT_S,
    attempts: int = MAX_ATTEMPTS,
) -> Any:
    """An S3 client from boto3's standard configuration (lazy import: boto3 is optional),
    with short timeouts and ``attempts`` tries per call (botocore's standard retry mode), so a
    hung server costs a caller seconds, not minutes."""
    require_boto3()
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": attempts},
    )
    return boto3.client("s3", config=config)


@dataclass(frozen=True)
class Fetched:
    """An object's body with its ETag, last-modified time and the server's clock."""

    body: bytes
    etag: str
    last_modified: datetime
    server_time: datetime | None


class Objects:
    """The few S3 calls the store makes, on one bucket; botocore's errors become
    :class:`StoreUnavailableError` (or ``None`` for a missing object)."""

    def __init__(self, bucket: str, client: Any = None) -> None:
        self.bucket = bucket
        self.client = client if client is not None else make_client()

    def _call(self, operation: str, key: str, **kwargs: Any) -> Any:
        """``client.<operation>(Bucket=..., Key=key, **kwargs)``; ``None`` when the object is
        missing, :class:`ConditionFailedError` when a condition failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, Key=key, **kwargs)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code == CONDITION_CONFLICT:
                raise ConditionConflictError(f"s3://{self.bucket}/{key}: {code}") from None
            if code == CONDITION_FAILED:
                raise ConditionFailedError(f"s3://{self.bucket}/{key}: {code}") from None
            if code in NOT_FOUND:
                return None
            raise StoreUnavailableError(f"S3 {operation} s3://{self.bucket}/{key}: {err}") from None
        except BotoCoreError as err:
            raise StoreUnavailableError(f"S3 {operation} s3://{self.bucket}/{key}: {err}") from None

    def get(self, key: str) -> Fetched | None:
        """The object, or ``None`` if there is none."""
        response = self._call("get_object", key)
        if response is None:
            return None
        from botocore.exceptions import BotoCoreError

        try:
            body = response["Body"].read()
        except BotoCoreError as err:
            raise StoreUnavailableError(f"S3 read s3://{self.bucket}/{key}: {err}") from None
        date = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        return Fetched(
            body,
            response["ETag"],
            response["LastModified"],
            parsedate_to_datetime(date) if date else None,
        )

    def etag(self, key: str) -> str | None:
        """The object's ETag (one HEAD), or ``None`` if there is none."""
        response = self._call("head_object", key)
        return None if response is None else str(response["ETag"])

    def exists(self, key: str) -> bool:
        return self.etag(key) is not None

    def last_modified(self, key: str) -> datetime | None:
        """The object's Last-Modified (one HEAD), or ``None`` if there is none."""
        response = self._call("head_object", key)
        return None if response is None else response["LastModified"]

    def put(
        self,
        key: str,
        body: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Write an object; returns its ETag. ``if_none_match``: only if no object has the key;
        ``if_match``: only if the object still has that ETag (else :class:`ConditionFailedError`).
        The body's sha256 goes along, so the server refuses a body damaged on the way."""
        kwargs: dict[str, Any] = {
            "Body": body,
            "ChecksumSHA256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
        }
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        response = self._call("put_object", key, **kwargs)
        if response is None:  # If-Match on a key that is gone
            raise ConditionFailedError(f"s3://{self.bucket}/{key}: no such object")
        return str(response["ETag"])

    def upload(self, key: str, path: Path, sha256_hex: str) -> None:
        """Upload a file whose sha256 is known (the server checks the body against it)."""
        with path.open("rb") as handle:
            self._call(
                "put_object",
                key,
                Body=handle,
                ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode(),
            )

    def download(self, key: str, path: Path) -> str | None:
        """Stream an object into ``path``; returns the sha256 of what was written, or ``None``
        (and no file) if the object does not exist."""
        from botocore.exceptions import BotoCoreError

        response = self._call("get_object", key)
        if response is None:
            return None
        digest = hashlib.sha256()
        try:
            with path.open("wb") as handle:
                for chunk in response["Body"].iter_chunks(CHUNK_BYTES):
                    digest.update(chunk)
                    handle.write(chunk)
        except BotoCoreError as err:
            raise StoreUnavailableError(f"S3 read s3://{self.bucket}/{key}: {err}") from None
        return digest.hexdigest()

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Delete an object (nothing if it is gone); with ``if_match`` only if unchanged."""
        self._call("delete_object", key, **({"IfMatch": if_match} if if_match else {}))

    def listing(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """``(key, last_modified)`` of every object whose key starts with ``prefix``."""
        for page in self._pages(Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"], item["LastModified"]

    def children(self, prefix: str) -> list[str]:
        """The names one level below ``prefix`` (which ends with '/'), like ``ls``."""
        names = []
        for page in self._pages(Prefix=prefix, Delimiter="/"):
            names += [
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            ]
        return names

    def any_under(self, prefix: str) -> bool:
        """Whether at least one object's key starts with ``prefix``."""
        for page in self._pages(Prefix=prefix, MaxKeys=1):
            if page.get("KeyCount", len(page.get("Contents", []))):
                return True
            break
        return False

    def _pages(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            yield from paginator.paginate(Bucket=self.bucket, **kwargs)
        except (BotoCoreError, ClientError) as err:
            raise StoreUnavailableError(
                f"S3 list s3://{self.bucket}/{kwargs['Prefix']}: {err}"
            ) from None
