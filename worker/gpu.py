"""GPU facts and hygiene that need no CUDA context: NVML for the heartbeat and preflight,
``CUDA_VISIBLE_DEVICES`` set before any fork, and out-of-memory turned into a job error.

Nothing here imports torch at module level; torch is only looked at once a backend loaded it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from jobs.errors import ErrorCode, Sam3dError

T = TypeVar("T")


def pin_gpu(index: int) -> None:
    """Make physical GPU ``index`` the only one this process and its children see.
    Call before anything touches CUDA (the worker's parent calls it before forking)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
    os.environ["SAM3D_GPU_INDEX"] = str(index)


def gpu_status(index: int | None = None) -> dict[str, Any] | None:
    """Name, total and free memory of a GPU (physical index), read through NVML so no CUDA
    context is created; None when there is no NVIDIA driver or no such GPU."""
    if index is None:
        index = int(os.environ.get("SAM3D_GPU_INDEX", "0"))
    try:
        import pynvml
    except ImportError:
        return _torch_status()
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            return {
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "memory_total_mb": memory.total // 2**20,
                "memory_free_mb": memory.free // 2**20,
                "memory_used_mb": memory.used // 2**20,
            }
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return _torch_status()


def _torch_status() -> dict[str, Any] | None:
    torch = sys.modules.get("torch")  # only if a backend already imported it
    if torch is None or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {
        "index": int(os.environ.get("SAM3D_GPU_INDEX", "0")),
        "name": torch.cuda.get_device_name(),
        "memory_total_mb": total // 2**20,
        "memory_free_mb": free // 2**20,
        "memory_used_mb": (total - free) // 2**20,
    }


def _is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def free_gpu_memory() -> None:
    """Return cached blocks to the driver after a failure, so the next job has them."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        with contextlib.suppress(Exception):
            torch.cuda.reset_peak_memory_stats()


def call_guarding_oom(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, with a CUDA out-of-memory error turned into
    ``Sam3dError(out_of_memory)`` (retryable) after freeing what the failed call held; any
    other exception passes through.

    Not a context manager on purpose: ``__exit__`` keeps the original exception, its
    traceback and every tensor its frames hold alive while it runs, and the new error would
    chain to it; here the memory is released before the error is raised.
    """
    message = None
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if not _is_cuda_oom(exc):
            raise
        message = str(exc).splitlines()[0][:300]
    # Outside the except block: the exception, its traceback and their tensors are gone.
    free_gpu_memory()
    raise Sam3dError(ErrorCode.OUT_OF_MEMORY, f"GPU out of memory: {message}")
