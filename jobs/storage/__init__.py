"""Artifact storage: one small interface, a local-disk driver and an S3 driver, chosen by URL.

Keys are relative POSIX paths such as ``jobs/<id>/objects/0.glb``. Every driver refuses keys
that could escape its root (absolute, ``..``, backslashes, control characters, empty
segments) and keys with a segment starting with ``.``, which the local driver reserves for
its own files (metadata sidecars, temporary files, the signing key).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import quote, urlsplit

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Iterator

# S3 DeleteObjects takes at most 1000 keys; ListObjectsV2 returns at most 1000 per page.
# Module constants so tests can lower them to exercise batching and pagination.
DELETE_BATCH = 1000
LIST_PAGE_SIZE = 1000
# SigV4 presigned URLs are valid for at most seven days.
MAX_S3_URL_TTL_S = 7 * 24 * 3600

DEFAULT_CONTENT_TYPE = "application/octet-stream"
SIGNING_KEY_FILE = ".signing-key"
_META_SUFFIX = ".meta.json"
_TMP_SUFFIX = ".tmp"
# Domain separation: a signature over a file URL can never be valid for anything else.
_SIGNING_CONTEXT = b"sam3d-jobs file url v1\n"


class StorageError(Exception):
    """The storage backend is unreachable, misconfigured or failed (not the caller's fault)."""


class SignatureError(Exception):
    """A signed file URL was refused; ``reason`` is "expired", "bad signature" or "malformed"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SignedUrl:
    """A URL that grants read access to one object until ``expires_at`` (UTC)."""

    url: str
    expires_at: datetime


@runtime_checkable
class Storage(Protocol):
    """What the API and the worker need from a storage backend."""

    def put(self, key: str, data: bytes, *, content_type: str, filename: str | None = None) -> None:
        """Store ``data`` under ``key``, replacing any previous object."""
        ...

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str,
        filename: str | None = None,
    ) -> None:
        """Store the local file ``path`` under ``key`` (streamed, never read whole)."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` when missing."""
        ...

    def size(self, key: str) -> int | None:
        """The object's size in bytes, ``None`` when missing."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; the number deleted."""
        ...

    def signed_url(
        self, key: str, *, expires_in: int, base_url: str = "", filename: str | None = None
    ) -> SignedUrl:
        """A URL that reads ``key`` for ``expires_in`` seconds."""
        ...

    def check(self) -> None:
        """Readiness probe: return when usable, raise ``StorageError`` otherwise."""
        ...


def validate_key(key: str) -> str:
    """Return ``key`` when it is a safe relative POSIX path; ``ValueError`` otherwise."""
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"storage key must be relative: {key!r}")
    if "\\" in key:
        raise ValueError(f"storage key must not contain backslashes: {key!r}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        raise ValueError(f"storage key must not contain control characters: {key!r}")
    for segment in key.split("/"):
        if not segment:
            raise ValueError(f"storage key has an empty segment: {key!r}")
        if segment.startswith("."):
            # Covers "." and ".." (traversal) and the local driver's reserved hidden files.
            raise ValueError(f"storage key segment must not start with '.': {key!r}")
    return key


def _validate_prefix(prefix: str) -> str:
    # A trailing slash is the usual way to say "this folder"; an empty prefix would mean
    # "everything", which no caller should ever ask for by accident.
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def content_disposition(filename: str | None) -> str:
    """``inline``, or ``attachment`` with an ASCII fallback name plus RFC 5987 ``filename*``."""
    if not filename:
        return "inline"
    name = "".join(ch for ch in filename if ord(ch) >= 0x20 and ord(ch) != 0x7F)
    name = name.replace("/", "_").replace("\\", "_")
    fallback = name.encode("ascii", "replace").decode("ascii").replace('"', "'")
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += f"; filename*=UTF-8''{quote(name, safe='')}"
    return value


def _utc_from_unix(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# --------------------------------------------------------------------------- local disk


def _sidecar_name(name: str) -> str:
    return f".{name}{_META_SUFFIX}"


def _owner_of_internal(name: str) -> str | None:
    """The object name a hidden sidecar or temp file belongs to, ``None`` for other files."""
    if not name.startswith(".") or name == SIGNING_KEY_FILE:
        return None
    if name.endswith(_META_SUFFIX):
        return name[1 : -len(_META_SUFFIX)] or None
    if name.endswith(_TMP_SUFFIX):
        # ".<name>.<random>.tmp", as made by tempfile.mkstemp in _write_atomic.
        owner, dot, _ = name[1 : -len(_TMP_SUFFIX)].rpartition(".")
        return owner if dot and owner else None
    return None


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new content, never a mix."""
    for attempt in range(2):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
        except FileNotFoundError:
            # A concurrent delete_prefix pruned the folder between mkdir and mkstemp.
            if attempt:
                raise
            continue
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return


def _copy_atomic(source: Path, path: Path, mode: int = 0o644) -> None:
    """Copy ``source`` to ``path`` so readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle, open(source, "rb") as src:
            shutil.copyfileobj(src, handle, 8 * 2**20)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class FileStorage:
    """Objects as files under one folder, served by the API through HMAC-signed URLs.

    Each object ``dir/name`` has a JSON sidecar ``dir/.name.meta.json`` holding its content
    type and download name. Sidecars and temporary files are hidden (leading dot), which
    keys can never name, so they are never counted, listed or served as objects.
    """

    def __init__(self, root: str | os.PathLike[str], *, signing_secret: str = "") -> None:
        self.root = Path(root).resolve()
        self._explicit_secret = signing_secret.encode() if signing_secret else None
        self._secret: bytes | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, signing_secret: str = "") -> FileStorage:
        """A store for ``file:///abs/dir`` or ``file://relative/dir`` (resolved from the cwd)."""
        if not url.lower().startswith("file://"):
            raise ValueError(f"not a file:// URL: {url!r}")
        rest = url[len("file://") :]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        if not rest:
            raise ValueError(f"file:// URL names no folder: {url!r}")
        return cls(Path(rest), signing_secret=signing_secret)

    def __repr__(self) -> str:
        return f"FileStorage({str(self.root)!r})"

    # -- paths

    def _path(self, key: str) -> Path:
        """The file of ``key``; ``KeyError`` when a symlink lies on the way (storage never
        follows one: a link planted in the folder must not serve or overwrite other files)."""
        path = self.root
        for part in validate_key(key).split("/"):
            path = path / part
            if path.is_symlink():
                raise KeyError(key)
        return path

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(_sidecar_name(path.name))

    # -- interface

    def put(self, key: str, data: bytes, *, content_type: str, filename: str | None = None) -> None:
        """Store ``data`` atomically with its content type and download name."""
        path = self._writable(key)
        meta = json.dumps({"content_type": content_type, "filename": filename}).encode()
        try:
            # Metadata first: once the data file appears, its metadata is already there.
            _write_atomic(self._sidecar(path), meta)
            _write_atomic(path, bytes(data))
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str,
        filename: str | None = None,
    ) -> None:
        """Copy the local file ``path`` in atomically, with its content type and download name."""
        target = self._writable(key)
        meta = json.dumps({"content_type": content_type, "filename": filename}).encode()
        try:
            _write_atomic(self._sidecar(target), meta)
            _copy_atomic(Path(path), target)
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def _writable(self, key: str) -> Path:
        try:
            return self._path(key)
        except KeyError:
            raise StorageError(f"cannot write {key!r} under {self.root}: a symlink") from None

    def get(self, key: str) -> bytes:
        """The object's bytes; ``KeyError`` when missing."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise KeyError(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc

    def size(self, key: str) -> int | None:
        """The object's size in bytes, ``None`` when missing."""
        try:
            st = self._path(key).stat()
        except KeyError:
            return None
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"cannot stat {key!r} under {self.root}: {exc}") from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        return self.size(key) is not None

    def open_meta(self, key: str) -> tuple[Path, str, str | None]:
        """The object's file path, content type and download name; ``KeyError`` when missing."""
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        content_type, filename = DEFAULT_CONTENT_TYPE, None
        try:
            meta = json.loads(self._sidecar(path).read_bytes())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict):
            if isinstance(meta.get("content_type"), str) and meta["content_type"]:
                content_type = meta["content_type"]
            if isinstance(meta.get("filename"), str) and meta["filename"]:
                filename = meta["filename"]
        return path, content_type, filename

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix`` (string prefix, as in S3)."""
        _validate_prefix(prefix)
        folder_key, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*folder_key.split("/")) if folder_key else self.root
        if not start.is_dir():
            return 0
        deleted = 0
        try:
            for dirpath, _dirnames, filenames in os.walk(start):
                here = Path(dirpath)
                rel = here.relative_to(self.root).as_posix()
                base = "" if rel == "." else rel + "/"
                for name in filenames:
                    owner = _owner_of_internal(name)
                    key = base + (owner if owner is not None else name)
                    if not key.startswith(prefix):
                        continue
                    if owner is None and name.startswith("."):
                        continue  # a hidden file that is not ours to delete
                    try:
                        (here / name).unlink()
                    except FileNotFoundError:
                        continue
                    if owner is None:
                        deleted += 1
            self._prune_empty(start, prefix)
        except OSError as exc:
            raise StorageError(f"cannot delete {prefix!r} under {self.root}: {exc}") from exc
        return deleted

    def _prune_empty(self, start: Path, prefix: str) -> None:
        """Remove emptied folders inside ``prefix`` and their empty parents, never the root."""
        for dirpath, _dirnames, _filenames in os.walk(start, topdown=False):
            folder = Path(dirpath)
            if folder == self.root:
                continue
            if (folder.relative_to(self.root).as_posix() + "/").startswith(prefix):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        folder = start
        while folder != self.root and self.root in folder.parents:
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                pass  # already pruned by the walk above
            except OSError:
                break  # not empty: its parents are not either
            folder = folder.parent

    def check(self) -> None:
        """Writable root and a usable signing key, or ``StorageError``."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".readyz.", suffix=_TMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise StorageError(f"storage folder {self.root} is not writable: {exc}") from exc
        self._signing_secret()

    # -- signing

    def _signing_secret(self) -> bytes:
        if self._explicit_secret is not None:
            return self._explicit_secret
        with self._lock:
            if self._secret is None:
                self._secret = self._load_or_create_secret()
            return self._secret

    def _load_or_create_secret(self) -> bytes:
        path = self.root / SIGNING_KEY_FILE
        try:
            return self._read_secret(path)
        except FileNotFoundError:
            pass
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".signing-key.", suffix=_TMP_SUFFIX)
            try:
                with os.fdopen(fd, "w") as handle:  # mkstemp creates it with mode 0600
                    handle.write(secrets.token_hex(32) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                # link() publishes the complete file or fails when another process won
                # the race; either way every process then reads the one key on disk.
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return self._read_secret(path)
        except OSError as exc:
            raise StorageError(f"cannot create signing key {path}: {exc}") from exc

    @staticmethod
    def _read_secret(path: Path) -> bytes:
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise StorageError(f"signing key {path} is truncated or empty; delete it to renew")
        return secret.encode()

    def _signature(self, key: str, expires: str) -> str:
        message = _SIGNING_CONTEXT + key.encode() + b"\n" + expires.encode()
        return hmac.new(self._signing_secret(), message, hashlib.sha256).hexdigest()

    def signed_url(
        self, key: str, *, expires_in: int, base_url: str = "", filename: str | None = None
    ) -> SignedUrl:
        """``{base_url}/files/{key}?expires={unix}&sig={hex}``.

        ``filename`` is accepted for interface parity and ignored: the API serves the
        download name stored by ``put``.
        """
        validate_key(key)
        expires = int(time.time()) + int(expires_in)
        sig = self._signature(key, str(expires))
        url = f"{base_url.rstrip('/')}/files/{quote(key, safe='/')}?expires={expires}&sig={sig}"
        return SignedUrl(url=url, expires_at=_utc_from_unix(expires))

    def verify(self, key: str, expires: str, sig: str) -> None:
        """Accept a signed URL's parts or raise ``SignatureError`` saying why not."""
        try:
            validate_key(key)
        except ValueError:
            raise SignatureError("malformed") from None
        if not (isinstance(expires, str) and expires.isascii() and expires.isdigit()):
            raise SignatureError("malformed")
        if len(expires) > 12:
            raise SignatureError("malformed")
        if not (isinstance(sig, str) and len(sig) == 64 and sig.isascii()):
            raise SignatureError("malformed")
        if any(ch not in "0123456789abcdef" for ch in sig):
            raise SignatureError("malformed")
        # Signature before expiry, so a forged expiry reads as forged, not as expired.
        if not hmac.compare_digest(self._signature(key, expires), sig):
            raise SignatureError("bad signature")
        if time.time() > int(expires):
            raise SignatureError("expired")


# --------------------------------------------------------------------------- S3


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
        _validate_prefix(prefix)
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
        return SignedUrl(url=url, expires_at=_utc_from_unix(now) + timedelta(seconds=expires_in))

    def check(self) -> None:
        """The bucket exists and our credentials reach it, or ``StorageError``."""
        with self._errors("head bucket"):
            self._client.head_bucket(Bucket=self.bucket)


def open_storage(settings: Settings) -> Storage:
    """The driver named by ``settings.storage_url``: ``file://DIR`` or ``s3://bucket/prefix``."""
    url = settings.storage_url
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    try:
        if scheme == "file":
            return FileStorage.from_url(url, signing_secret=settings.signing_secret)
        if scheme == "s3":
            return S3Storage.from_url(url, settings)
    except ValueError as exc:
        raise Sam3dError(ErrorCode.INVALID_OPTION, f"SAM3D_STORAGE_URL: {exc}") from None
    raise Sam3dError(
        ErrorCode.INVALID_OPTION,
        f"SAM3D_STORAGE_URL {url!r}: unsupported scheme; use file:///DIR or s3://BUCKET/PREFIX",
    )
