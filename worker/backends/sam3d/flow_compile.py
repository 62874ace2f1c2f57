"""``torch.compile`` where it pays: stage 1's flow transformer blocks (``SAM3D_COMPILE_FLOW``).

Upstream's own option (``SAM3D_COMPILE_MODEL``) compiles more, with ``max-autotune``, and
its warm-up did not finish in 110 s. Here the 24 blocks of the stage-1 backbone go through one
compiled function in the default mode (no autotuning), each block passing itself as an
argument, so the identical blocks share one graph. What it gains is fusion: the adaptive-norm
modulation, gates and residuals between the matrix products become a few kernels (stage 1
about 20-30 % faster; compiled in the worker's set-up, so no job pays for it: measurements in
docs/perf/2026-12-04-sam3d-knobs.md).

The whole backbone does not trace (its timestep embedder calls numpy under the pipeline's
device context), and stage 2 works on sparse tensors whose layouts are Python slices: a
compiled block would be guarded on every job's voxel counts and recompile each job (so it is
not tried).

Shapes: the first batch size compiles a static graph; the next different one recompiles
with the batch dimension dynamic (dynamo's automatic dynamic shapes), which then serves every
batch size of 2 and more. ``warm_up`` runs both in the worker's set-up, so jobs do not pay
them. If compiling fails, the blocks run eagerly from then on (logged, and the fast path
reported off through ``on_fallback``), never failing a job; nothing in dynamo's configuration
changes for the rest of the process (its cache limit is raised for these calls only).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from worker.backends.sam3d import patching
from worker.backends.sam3d.patching import Patch

log = logging.getLogger("sam3d.worker")


def stage1_blocks(pipeline) -> list:
    """The transformer blocks of the stage-1 flow's backbone (none if the layout differs)."""
    generator = dict(getattr(pipeline, "models", {})).get("ss_generator")
    backbone = getattr(getattr(generator, "reverse_fn", None), "backbone", None)
    return list(getattr(backbone, "blocks", None) or [])


def _block_forward(block, *args):
    return type(block).forward(block, *args)


CACHE_SIZE_LIMIT = 64  # graphs per code object: one per batch-size regime, with room


def _guarded(compiled: Callable, on_fallback: Callable[[str], None] | None) -> Callable:
    """``compiled(block, *args)``, or the block's own forward once compiling has failed."""
    import torch

    failed: list[str] = []

    @torch._dynamo.config.patch(cache_size_limit=CACHE_SIZE_LIMIT)
    def forward(block, *args):
        if failed:
            return _block_forward(block, *args)
        try:
            return compiled(block, *args)
        except torch.OutOfMemoryError:
            raise  # the job's to handle, as eagerly
        except Exception as exc:  # noqa: BLE001 - dynamo's and inductor's many error types
            reason = f"torch.compile failed ({type(exc).__name__}: {exc})"[:300]
            failed.append(reason)
            log.warning("stage 1's flow blocks run eagerly from now on: %s", reason)
            if on_fallback is not None:
                on_fallback(reason)
            return _block_forward(block, *args)

    return forward


def flow_patches(
    pipeline, backend: str = "inductor", on_fallback: Callable[[str], None] | None = None
) -> list[tuple[Any, str, Any]]:
    """(block, "forward", compiled) for each stage-1 block; one compiled function for all,
    kept on the pipeline so every caller shares its graphs. ``on_fallback(reason)``: called
    once if compiling fails (the blocks then run eagerly)."""
    import torch

    blocks = stage1_blocks(pipeline)
    compiled = getattr(pipeline, "_sam3d_jobs_compiled_block", None)
    if blocks and compiled is None:
        compiled = _guarded(torch.compile(_block_forward, backend=backend), on_fallback)
        pipeline._sam3d_jobs_compiled_block = compiled
    return [(block, "forward", functools.partial(compiled, block)) for block in blocks]


def eager_patches(pipeline) -> list[tuple[Any, str, Any]]:
    """(block, "forward", its class's forward) for each stage-1 block: eager again for as long
    as the patches hold, compiled or not (the bench's upstream way, the GPU test's reference)."""
    blocks = stage1_blocks(pipeline)
    return [(block, "forward", functools.partial(type(block).forward, block)) for block in blocks]


def compile_flow(
    pipeline, backend: str = "inductor", on_fallback: Callable[[str], None] | None = None
) -> int:
    """Put the stage-1 blocks under ``torch.compile`` for the process's life (a setup-time
    patch: ``patching.process_wide``); how many blocks it took."""
    patches = flow_patches(pipeline, backend, on_fallback)
    patching.process_wide(Patch(obj, name, value, "compile_flow") for obj, name, value in patches)
    return len(patches)


def warm_up(pipeline, image, mask, kwargs) -> float:
    """Both graphs now, not in a job: stage 1 for a batch of one object, then of two
    (``flow.sample_stage1``, on one input). Seconds it took."""
    import time

    from worker.backends.sam3d.flow import sample_stage1, stage1_input

    t0 = time.perf_counter()
    ss_input = stage1_input(pipeline, image, mask)
    for count in (1, 2):
        sample_stage1(pipeline, ss_input, count, kwargs)
    return time.perf_counter() - t0
