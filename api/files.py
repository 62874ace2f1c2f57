"""``/files/<key>``: local-disk artifacts behind HMAC-signed, expiring URLs."""

from __future__ import annotations

from flask import Blueprint, current_app, request, send_file

from api.errors import ApiError
from jobs.storage import FileStorage, SignatureError, content_disposition

bp = Blueprint("files", __name__)


@bp.get("/files/<path:key>")
def serve(key: str):
    storage = current_app.extensions["sam3d_storage"]
    if not isinstance(storage, FileStorage):
        raise ApiError(404, "not_found", "files are served by the object store, not the API")
    try:
        storage.verify(key, request.args.get("expires", ""), request.args.get("sig", ""))
    except SignatureError as exc:
        raise ApiError(403, "forbidden", f"signed URL refused: {exc.reason}") from None
    try:
        path, content_type, filename = storage.open_meta(key)
    except KeyError:
        raise ApiError(404, "not_found", "no such file") from None
    response = send_file(path, mimetype=content_type, conditional=True, max_age=0)
    response.headers["Content-Disposition"] = content_disposition(filename)
    response.headers["Cache-Control"] = "private, no-store"
    return response
