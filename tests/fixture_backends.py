"""Hand-written stand-ins for failure modes of a real model, loaded by real worker processes
with ``--backend fixture_backends:Name`` (SAM 3D's weights cannot run here; these wrap the
real ``inflate`` backend and add the behaviour under test)."""

from __future__ import annotations

import os
import time
from dataclasses import replace

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


class GpuHog(InflateBackend):
    """The first object of a process asks the GPU for far more memory than it has, while
    holding 2 GiB: the worker must fail that job ``out_of_memory``, free the 2 GiB and go on
    serving (later objects are plain inflate). On a machine without CUDA it raises torch's
    own OutOfMemoryError, so the same path runs on the CPU."""

    name = "gpu-hog"
    device = "cuda"
    hogged = False

    def setup(self) -> None:
        # torch loads here, once per process, not inside the first job's time limit (seconds
        # on a loaded machine: the job would end "timeout", not "out_of_memory").
        import torch  # noqa: F401

        super().setup()

    def generate(self, image, mask, **kwargs):
        import torch

        if not GpuHog.hogged:
            GpuHog.hogged = True
            if torch.cuda.is_available():
                held = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
                huge = torch.empty(2**47, dtype=torch.uint8, device="cuda")  # 128 TiB
                del held, huge
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 TiB")
        return super().generate(image, mask, **kwargs)


class BatchedInflate(InflateBackend):
    """Generates a job's objects together, as the batched SAM 3D path does: one wait of
    SLOW_SECONDS, then every result at once, so the export threads get a burst to share."""

    name = "batched-inflate"

    def generate_many(self, image, masks, *, camera, seeds, options, **extra):
        time.sleep(SLOW_SECONDS)
        results = [
            super(BatchedInflate, self).generate(
                image, masks[i], camera=camera, seed=seeds[i], options=options, **extra
            )
            for i in range(len(masks))
        ]
        yield from results


class ExportFailsOnThird(BatchedInflate):
    """Batched, and the third object's mesh names a vertex it does not have: its export
    raises on an export thread while others are exported beside it."""

    name = "export-fails-on-third"

    def generate_many(self, image, masks, **kwargs):
        for i, result in enumerate(super().generate_many(image, masks, **kwargs)):
            if i == 2:
                faces = result.mesh.faces.copy()
                faces[0, 0] = len(result.mesh.vertices) + 10
                result = replace(result, mesh=replace(result.mesh, faces=faces))
            yield result


class FastPathsInflate(InflateBackend):
    """Inflate reporting fast paths as the sam3d backend does after its setup: one engaged,
    one found off (what its heartbeat and GET /v1/backends carry)."""

    name = "fast-paths-inflate"

    def setup(self) -> None:
        from worker.backends.sam3d.surface import FastPath

        super().setup()
        self.fast_paths = {
            "cfg_pairs": FastPath("cfg_pairs", True, "on"),
            "row_group_norms": FastPath("row_group_norms", False, "upstream lacks x"),
        }
