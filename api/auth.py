"""Optional API keys: ``Authorization: Bearer <key>``; off when no keys are configured."""

from __future__ import annotations

import hmac

from flask import current_app, g, request

from jobs.errors import ErrorCode, Sam3dError
from jobs.records import owner_of


def bearer_token() -> str | None:
    """The token of an ``Authorization: Bearer`` header, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def current_owner(token: str | None = None) -> str:
    """The caller's owner id; raises 401 when keys are on and the request has no valid one.

    ``token``: a key the route found elsewhere (Roboflow's clients send ``api_key`` in the
    query or the body); the Bearer header otherwise."""
    if "owner" in g:
        return g.owner
    keys = current_app.config["SETTINGS"].api_keys
    if not keys:
        g.owner = owner_of(None)
        return g.owner
    token = token or bearer_token()
    if not token:
        raise Sam3dError(
            ErrorCode.UNAUTHORIZED,
            "missing API key",
            headers={"WWW-Authenticate": 'Bearer realm="sam3d"'},
        )
    if not any(hmac.compare_digest(token.encode(), key.encode()) for key in keys):
        raise Sam3dError(
            ErrorCode.UNAUTHORIZED,
            "invalid API key",
            headers={"WWW-Authenticate": 'Bearer realm="sam3d"'},
        )
    g.owner = owner_of(token)
    return g.owner
