"""The storage interface every driver implements, its errors, and key rules.

Keys are relative POSIX paths such as ``jobs/<id>/objects/0.glb``. Every driver refuses keys
that could escape its root (absolute, ``..``, backslashes, control characters, empty
segments) and keys with a segment starting with ``.``, which the local driver reserves for
its own files (metadata sidecars, temporary files, the signing key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import quote

if TYPE_CHECKING:
    pass


DEFAULT_CONTENT_TYPE = "application/octet-stream"


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


def validate_prefix(prefix: str) -> str:
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


def utc_from_unix(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
