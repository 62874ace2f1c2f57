"""Optional API keys: ``Authorization: Bearer <key>``; off when no keys are configured."""

from __future__ import annotations

import hmac

from flask import current_app, g, request

from api.errors import ApiError
from jobs.records import owner_of


def current_owner() -> str:
    """The caller's owner id; raises 401 when keys are on and the request has no valid one."""
    if "owner" in g:
        return g.owner
    keys = current_app.config["SETTINGS"].api_keys
    if not keys:
        g.owner = owner_of(None)
        return g.owner
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(
            401, "unauthorized", "missing API key", {"WWW-Authenticate": 'Bearer realm="sam3d"'}
        )
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise ApiError(
            401, "unauthorized", "invalid API key", {"WWW-Authenticate": 'Bearer realm="sam3d"'}
        )
    g.owner = owner_of(token)
    return g.owner
