"""The S3 driver (``s3://bucket/prefix``): AWS, MinIO, R2 through boto3, imported lazily."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from jobs.settings import Settings
from jobs.storage.base import (
    SignedUrl,
    StorageError,
    content_disposition,
    utc_from_unix,
    validate_key,
    validate_prefix,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


# S3 DeleteObjects takes at most 1000 keys; ListObjectsV2 returns at most 1000 per page.
# Module constants so tests can lower them to exercise batching and pagination.
DELETE_BATCH = 1000
LIST_PAGE_SIZE = 1000
# SigV4 presigned URLs are valid for at most seven days.
MAX_S3_URL_TTL_S = 7 * 24 * 3600


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Storage:
    """Objects in an S3-compatible bucket (AWS, MinIO, R2) under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str = "",
        public_endpoint_url: str = "",
        region: str = "us-east-1",
    ) -> None:
        if not bucket:
            raise ValueError("S3 storage needs a bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.endpoint_url = endpoint_url or None
        # SigV4 signs the host: sign URLs for the endpoint that clients will actually reach.
        self.public_endpoint_url = public_endpoint_url or endpoint_url or None
        self.region = region
        self._lock = threading.Lock()
        self._clients: tuple[Any, Any] | None = None

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> S3Storage:
        """A store for ``s3://bucket/prefix`` with endpoints and region from ``settings``."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
        return cls(
            parts.netloc,
            parts.path,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
        )

    def __repr__(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"S3Storage({where!r}, endpoint={self.endpoint_url!r})"

    # -- clients

    def _make_client(self, session: Any, endpoint_url: str | None) -> Any:
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            # MinIO and most self-hosted servers need path-style; AWS prefers virtual hosts.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=60,
        )
        return session.client("s3", endpoint_url=endpoint_url, config=config)

    def _get_clients(self) -> tuple[Any, Any]:
        # boto3 clients are thread-safe, sessions are not: build both once, under a lock.
        with self._lock:
            if self._clients is None:
                import boto3.session

                session = boto3.session.Session()
                client = self._make_client(session, self.endpoint_url)
                if self.public_endpoint_url == self.endpoint_url:
                    public = client
                else:
                    public = self._make_client(session, self.public_endpoint_url)
                self._clients = (client, public)
            return self._clients

    @property
    def _client(self) -> Any:
        return self._get_clients()[0]

    def _full_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = _client_error_code(exc)
            if key and code in {"NoSuchKey", "404", "NotFound"}:
                raise KeyError(key) from None
            raise StorageError(f"s3://{self.bucket}: {action} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"s3://{self.bucket}: {action} failed: {exc}") from exc

    # -- interface

    def put(self, key: str, data: bytes, *, content_type: str, filename: str | None = None) -> None:
        """Upload ``data`` with Content-Type and Content-Disposition set."""
        full = self._full_key(key)
        with self._errors(f"put {key!r}"):
            self._client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=bytes(data),
                ContentType=content_type,
                ContentDisposition=content_disposition(filename),
            )

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str,
        filename: str | None = None,
    ) -> None:
        """Upload the local file ``path`` (multipart above 8 MB, parts in parallel)."""
        full = self._full_key(key)
        extra = {"ContentType": content_type, "ContentDisposition": content_disposition(filename)}
        from boto3.exceptions import S3UploadFailedError

        with self._errors(f"put {key!r}"):
            try:
                self._client.upload_file(str(path), self.bucket, full, ExtraArgs=extra)
            except S3UploadFailedError as exc:
                raise StorageError(f"s3://{self.bucket}: put {key!r} failed: {exc}") from exc

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` when missing."""
        full = self._full_key(key)
        with self._errors(f"get {key!r}", key):
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            return response["Body"].read()

    def size(self, key: str) -> int | None:
        """The object's size in bytes, ``None`` when missing."""
        full = self._full_key(key)
        try:
            with self._errors(f"head {key!r}", key):
                response = self._client.head_object(Bucket=self.bucket, Key=full)
        except KeyError:
            return None
        return int(response["ContentLength"])

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        return self.size(key) is not None

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``, in batches of ``DELETE_BATCH``."""
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        deleted = 0
        batch: list[dict[str, str]] = []

        def flush() -> None:
            nonlocal deleted
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"s3://{self.bucket}: {len(errors)} deletions failed, first "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}"
                )
            deleted += len(batch)
            batch.clear()

        with self._errors(f"delete prefix {prefix!r}"):
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=full_prefix,
                PaginationConfig={"PageSize": LIST_PAGE_SIZE},
            )
            for page in pages:
                for item in page.get("Contents") or []:
                    batch.append({"Key": item["Key"]})
                    if len(batch) >= DELETE_BATCH:
                        flush()
            if batch:
                flush()
        return deleted

    def signed_url(
        self, key: str, *, expires_in: int, base_url: str = "", filename: str | None = None
    ) -> SignedUrl:
        """A SigV4 presigned GET for the public endpoint; ``base_url`` is ignored."""
        if not 1 <= expires_in <= MAX_S3_URL_TTL_S:
            raise ValueError(f"S3 URLs last 1 to {MAX_S3_URL_TTL_S} s, not {expires_in}")
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._full_key(key)}
        if filename:
            params["ResponseContentDisposition"] = content_disposition(filename)
        # Taken before signing, so expires_at is never later than the URL's real expiry.
        now = int(time.time())
        with self._errors(f"sign {key!r}"):
            url = self._get_clients()[1].generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires_in
            )
        return SignedUrl(url=url, expires_at=utc_from_unix(now) + timedelta(seconds=expires_in))

    def check(self) -> None:
        """The bucket exists and our credentials reach it, or ``StorageError``."""
        with self._errors("head bucket"):
            self._client.head_bucket(Bucket=self.bucket)
