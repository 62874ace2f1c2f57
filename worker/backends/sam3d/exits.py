"""Rows leaving a cross-job batch mid-flow (``step_exits``): a check before every flow step."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from worker.backends.sam3d import patching
from worker.backends.sam3d.patching import Patch


class Leave(Exception):
    """Rows of the part in progress must leave the batch (``leaving``)."""


@contextlib.contextmanager
def step_exits(pipeline, check: Callable[[], None], enabled: bool = True):
    """Within: ``check()`` before every flow step of both stages (each generator's
    ``_generate_dynamics``, per instance), so that rows can leave a batch mid-flow."""
    patches = []
    for name in ("ss_generator", "slat_generator") if enabled else ():
        generator = pipeline.models[name]
        own = generator._generate_dynamics

        def dynamics(*args, _own=own, **kwargs):
            check()
            return _own(*args, **kwargs)

        patches.append(Patch(generator, "_generate_dynamics", dynamics, "step_exits"))
    with patching.scoped(patches):
        yield
