"""Hand-written stand-ins for failure modes of a real model, loaded by real worker processes
with ``--backend fixture_backends:Name`` (SAM 3D's weights cannot run here; these wrap the
real ``inflate`` backend and add the behaviour under test)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

from jobs.errors import ErrorCode, Sam3dError
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


class CrossJobInflate(InflateBackend):
    """A stand-in for SAM 3D's batching across jobs (whose weights cannot run here).

    Every object of every job in the batch goes through one shared pass of
    ``SAM3D_FIXTURE_STEPS`` "flow steps" of ``SAM3D_FIXTURE_STEP_S`` each, asking ``leaving()``
    at each step as the sam3d backend does; rows that must leave restart the pass without
    them (the sam3d backend's part restarts the same way). Each pass start is appended as a
    JSON line (its jobs, its rows) to ``SAM3D_FIXTURE_BATCH_LOG``. An object with seed 13
    makes the shared pass fail, as an input only the model finds bad would; alone, its job
    fails with the same error."""

    name = "cross-job-inflate"

    def batch_key(self, options):
        return json.dumps({k: options.get(k) for k in ("resolution", "splats", "fov_deg")})

    def generate_batch(self, items, *, options, leaving):
        steps = int(os.environ.get("SAM3D_FIXTURE_STEPS", "10"))
        step_s = float(os.environ.get("SAM3D_FIXTURE_STEP_S", "0.2"))
        rows = [(item, pos) for item in items for pos in range(len(item.masks))]
        while True:
            gone = leaving()
            rows = [(item, pos) for item, pos in rows if item.key not in gone]
            if not rows:  # every row left: the "GPU" is free at once
                return
            self._log({"jobs": sorted({item.key for item, _ in rows}), "rows": len(rows)})
            if any(item.seeds[pos] == 13 for item, pos in rows):
                raise Sam3dError(ErrorCode.BACKEND_FAILED, "no voxels for an object (seed 13)")
            for _ in range(steps):
                time.sleep(step_s)
                if leaving() & {item.key for item, _ in rows}:
                    break  # the pass restarts without them
            else:
                break
        for item, pos in rows:
            if item.key in leaving():
                continue
            result = super().generate(
                item.image, item.masks[pos], camera=item.camera, seed=item.seeds[pos],
                options=options, **({"depth": item.depth} if item.depth is not None else {}),
            )  # fmt: skip
            yield item.key, pos, result

    def generate(self, image, mask, *, seed, **kwargs):
        if seed == 13:
            raise Sam3dError(ErrorCode.BACKEND_FAILED, "no voxels for an object (seed 13)")
        return super().generate(image, mask, seed=seed, **kwargs)

    @staticmethod
    def _log(entry: dict) -> None:
        path = os.environ.get("SAM3D_FIXTURE_BATCH_LOG")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
