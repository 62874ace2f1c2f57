"""The one way this backend changes upstream's behaviour.

Every change is a ``Patch``: an object (a module, a class or one instance of the pipeline), the
attribute replaced, its replacement, and the fast path it belongs to (``surface``). Two scopes,
named by the two functions, and nothing else:

- ``scoped(patches)``: a context manager (``unittest.mock.patch.object`` per patch, in an
  ``ExitStack``): applied on entry, each undone on exit in reverse order, whatever ends the
  scope; an attribute the object inherited is deleted again, so its class's shows through.
  The batched flow enters its patches for one job's ``generate_outputs`` and the per-mask
  path for one object's ``run()``; instance patches touch only the pipeline they name.
- ``process_wide(patches)``: applied once, for the life of the process, and only at setup (the
  attention binding, the compiled stage-1 blocks); each is logged at INFO.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

log = logging.getLogger("sam3d.worker")


@dataclass(frozen=True)
class Patch:
    """``target.attribute`` replaced by ``value`` for fast path ``fast_path``. ``create``: the
    attribute need not exist before (a module global upstream only defines in another mode)."""

    target: Any
    attribute: str
    value: Any
    fast_path: str
    create: bool = False

    def describe(self) -> str:
        owner = getattr(self.target, "__name__", None) or type(self.target).__name__
        return f"{owner}.{self.attribute} ({self.fast_path})"


@contextlib.contextmanager
def scoped(patches: Iterable[Patch]) -> Iterator[list[Patch]]:
    """``patches`` applied within, each undone on leaving (see the module docstring)."""
    applied = list(patches)
    with contextlib.ExitStack() as stack:
        for patch in applied:
            stack.enter_context(
                mock.patch.object(patch.target, patch.attribute, patch.value, create=patch.create)
            )
        if applied:
            log.debug("patched for this scope: %s", ", ".join(p.describe() for p in applied))
        yield applied


def process_wide(patches: Iterable[Patch]) -> list[Patch]:
    """``patches`` applied for the life of the process (setup only); each logged."""
    applied = list(patches)
    for patch in applied:
        if not patch.create and not hasattr(patch.target, patch.attribute):
            raise AttributeError(f"{patch.describe()}: upstream has no such attribute")
        setattr(patch.target, patch.attribute, patch.value)
        log.info("process-wide patch: %s", patch.describe())
    return applied
