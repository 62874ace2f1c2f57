"""``/files/<key>``: local-disk artifacts behind HMAC-signed, expiring URLs."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint, Response, current_app, request, send_file

from jobs.errors import ErrorCode, Sam3dError
from jobs.storage import FileStorage, SignatureError, content_disposition

bp = Blueprint("files", __name__)
# PLY and GLB shrink well under gzip (float arrays); SPZ and USDZ are compressed already.
GZIP_SUFFIXES = (".ply", ".glb")
GZIP_LEVEL = 5
_CHUNK = 1 << 20


def _accepts_gzip() -> bool:
    for part in request.headers.get("Accept-Encoding", "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "*") and params.replace(" ", "") != "q=0":
            return True
    return False


def _gzip_stream(path: Path) -> Iterator[bytes]:
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            if out := packer.compress(chunk):
                yield out
    yield packer.flush()


@bp.get("/files/<path:key>")
def serve(key: str):
    storage = current_app.extensions["sam3d_storage"]
    if not isinstance(storage, FileStorage):
        raise Sam3dError(ErrorCode.NOT_FOUND, "files are served by the object store, not the API")
    try:
        storage.verify(key, request.args.get("expires", ""), request.args.get("sig", ""))
    except SignatureError as exc:
        raise Sam3dError(ErrorCode.FORBIDDEN, f"signed URL refused: {exc.reason}") from None
    try:
        path, content_type, filename = storage.open_meta(key)
    except KeyError:
        raise Sam3dError(ErrorCode.NOT_FOUND, "no such file") from None
    if key.endswith(GZIP_SUFFIXES) and _accepts_gzip() and "Range" not in request.headers:
        # Compressed as it streams: the length is unknown up front, so no Content-Length.
        response = Response(_gzip_stream(Path(path)), mimetype=content_type)
        response.headers["Content-Encoding"] = "gzip"
    else:
        response = send_file(path, mimetype=content_type, conditional=True, max_age=0)
    response.headers["Vary"] = "Accept-Encoding"
    response.headers["Content-Disposition"] = content_disposition(filename)
    response.headers["Cache-Control"] = "private, no-store"
    return response
