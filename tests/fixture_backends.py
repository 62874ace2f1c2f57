"""Hand-written stand-ins for failure modes of a real model, loaded by real worker processes
with ``--backend fixture_backends:Name`` (SAM 3D's weights cannot run here; these wrap the
real ``inflate`` backend and add the behaviour under test)."""

from __future__ import annotations

import os
import time

from worker.backends.inflate import InflateBackend

SLOW_SECONDS = float(os.environ.get("SAM3D_FIXTURE_SLOW_S", "1.0"))


class SlowInflate(InflateBackend):
    """Inflate, but each object takes at least SLOW_SECONDS: time to cancel or kill it."""

    name = "slow-inflate"

    def generate(self, image, mask, **kwargs):
        time.sleep(SLOW_SECONDS)
        return super().generate(image, mask, **kwargs)


class CrashingBackend(InflateBackend):
    """Kills its own process mid-job, like a segfault or the kernel's OOM killer: a poison job."""

    name = "crashing"

    def generate(self, image, mask, **kwargs):
        os._exit(1)


class FailingBackend(InflateBackend):
    """Raises an ordinary exception: a model bug, not the input's fault."""

    name = "failing"

    def generate(self, image, mask, **kwargs):
        raise RuntimeError("the model fell over")
