"""Generators. ``get_backend`` builds one by name; heavy ones are imported lazily."""

from __future__ import annotations

from jobs.errors import ErrorCode, Sam3dError
from worker.backends.base import Backend

BACKENDS = ("inflate",)


def get_backend(name: str) -> Backend:
    """A backend instance by name (not yet set up)."""
    if name == "inflate":
        from worker.backends.inflate import InflateBackend

        return InflateBackend()
    raise Sam3dError(
        ErrorCode.UNKNOWN_BACKEND, f"unknown backend {name!r}; known: {', '.join(BACKENDS)}"
    )
