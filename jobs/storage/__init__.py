"""Artifact storage: one small interface (``base``), two drivers chosen by URL: the local
disk (``file``) and S3-compatible buckets (``s3``)."""

from __future__ import annotations

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings
from jobs.storage.base import (
    DEFAULT_CONTENT_TYPE,
    SignatureError,
    SignedUrl,
    Storage,
    StorageError,
    content_disposition,
    validate_key,
)
from jobs.storage.file import FileStorage
from jobs.storage.s3 import S3Storage

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "FileStorage",
    "S3Storage",
    "SignatureError",
    "SignedUrl",
    "Storage",
    "StorageError",
    "content_disposition",
    "open_storage",
    "validate_key",
]


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
