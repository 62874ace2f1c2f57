"""Generators. ``get_backend`` builds one by name; heavy ones are imported lazily.

Besides the built-in names, ``module:Class`` loads a backend class from an importable module
(a custom model, or the tests' fixture backends).
"""

from __future__ import annotations

import importlib

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings
from worker.backends.base import Backend

BACKENDS = ("inflate", "sam3d")


def get_backend(name: str, settings: Settings | None = None) -> Backend:
    """A backend instance by name (not yet set up; nothing heavy is imported yet)."""
    if name == "inflate":
        from worker.backends.inflate import InflateBackend

        return InflateBackend()
    if name == "sam3d":
        from worker.backends.sam3d import Sam3dBackend

        return Sam3dBackend(settings)
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as exc:
            raise Sam3dError(
                ErrorCode.UNKNOWN_BACKEND, f"cannot load backend {name!r}: {exc}"
            ) from None
        return cls()
    raise Sam3dError(
        ErrorCode.UNKNOWN_BACKEND,
        f"unknown backend {name!r}; known: {', '.join(BACKENDS)}, or module:Class",
    )
