"""The local-disk driver (``file://DIR``): files under one folder, served by the API through
HMAC-signed, expiring URLs."""

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
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from jobs.storage.base import (
    DEFAULT_CONTENT_TYPE,
    SignatureError,
    SignedUrl,
    StorageError,
    utc_from_unix,
    validate_key,
    validate_prefix,
)

if TYPE_CHECKING:
    pass


SIGNING_KEY_FILE = ".signing-key"
_META_SUFFIX = ".meta.json"
_TMP_SUFFIX = ".tmp"
# Domain separation: a signature over a file URL can never be valid for anything else.
_SIGNING_CONTEXT = b"sam3d-jobs file url v1\n"


def _sidecar_name(name: str) -> str:
    return f".{name}{_META_SUFFIX}"


def _owner_of_internal(name: str) -> str | None:
    """The object name a hidden sidecar or temp file belongs to, ``None`` for other files."""
    if not name.startswith(".") or name == SIGNING_KEY_FILE:
        return None
    if name.endswith(_META_SUFFIX):
        return name[1 : -len(_META_SUFFIX)] or None
    if name.endswith(_TMP_SUFFIX):
        # ".<name>.<random>.tmp", as made by tempfile.mkstemp in _replace_atomic.
        owner, dot, _ = name[1 : -len(_TMP_SUFFIX)].rpartition(".")
        return owner if dot and owner else None
    return None


def _replace_atomic(path: Path, fill, mode: int = 0o644) -> None:
    """Replace ``path`` with what ``fill(handle)`` writes, so readers see the old or the new
    content, never a mix: a temporary file beside it, synced, then renamed over it."""
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
                fill(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (``_replace_atomic``)."""
    _replace_atomic(path, lambda handle: handle.write(data), mode)


def _copy_atomic(source: Path, path: Path, mode: int = 0o644) -> None:
    """Copy ``source`` to ``path`` atomically (``_replace_atomic``), streamed in 8 MB reads."""
    with open(source, "rb") as src:
        _replace_atomic(path, lambda handle: shutil.copyfileobj(src, handle, 8 * 2**20), mode)


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
        self._store(key, content_type, filename, lambda path: _write_atomic(path, bytes(data)))

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        content_type: str,
        filename: str | None = None,
    ) -> None:
        """Copy the local file ``path`` in atomically, with its content type and download name."""
        self._store(key, content_type, filename, lambda target: _copy_atomic(Path(path), target))

    def _store(self, key: str, content_type: str, filename: str | None, write) -> None:
        """The metadata sidecar, then ``write(path)`` of the data: once the data file
        appears, its metadata is already there."""
        path = self._writable(key)
        meta = json.dumps({"content_type": content_type, "filename": filename}).encode()
        try:
            _write_atomic(self._sidecar(path), meta)
            write(path)
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
        validate_prefix(prefix)
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
        return SignedUrl(url=url, expires_at=utc_from_unix(expires))

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
