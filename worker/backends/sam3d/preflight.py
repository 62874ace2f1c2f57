"""What the ``sam3d`` backend checks before loading anything: the checkpoint folder, the
packages, the attention choice and the GPU (through NVML: no CUDA context, so it is safe in a
forking parent). ``PreflightError`` lists every problem at once; the worker exits with the
preflight code on it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from jobs.errors import ErrorCode, Sam3dError
from jobs.settings import Settings

UPSTREAM_PACKAGE = "sam3d_objects"
REQUIREMENTS_FILE = "requirements/gpu.txt"
# pipeline.yaml names these relative to the checkpoint folder.
MODELS = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh")
REQUIRED_FILES = ("pipeline.yaml",) + tuple(
    f"{m}.{ext}" for m in MODELS for ext in ("yaml", "ckpt")
)
GAUSSIAN_4_FILES = ("slat_decoder_gs_4.yaml", "slat_decoder_gs_4.ckpt")


class PreflightError(Sam3dError):
    """The worker cannot run the model here; the message says what to fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            ErrorCode.PREFLIGHT_FAILED,
            "cannot start the sam3d backend:\n" + "\n".join(f"  - {p}" for p in problems),
        )
        self.problems = problems


# -- preflight ---------------------------------------------------------------------------------


def missing_checkpoint_files(checkpoint_dir: str | Path) -> list[str]:
    """Required files absent from the checkpoint folder (all of them if it does not exist)."""
    folder = Path(checkpoint_dir)
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def preflight(settings: Settings, *, gpu_index: int | None = None) -> dict[str, Any]:
    """Everything checkable before loading: raises ``PreflightError`` listing every problem.

    Uses NVML for the GPU (no CUDA context: safe in a forking parent).
    """
    problems: list[str] = []
    folder = settings.checkpoint_dir
    if not folder:
        problems.append(
            "SAM3D_CHECKPOINT_DIR is not set: point it at the folder with pipeline.yaml and "
            "the weights (see README, 'Running the real model')"
        )
    elif not Path(folder).is_dir():
        problems.append(f"checkpoint folder {folder} does not exist")
    else:
        missing = missing_checkpoint_files(folder)
        if missing:
            problems.append(
                f"checkpoint folder {folder} is incomplete; missing: {', '.join(missing)}"
            )
    from worker.backends.sam3d.upstream import ATTENTION_CHOICES, upstream_available

    if not upstream_available():
        problems.append(
            f"the SAM 3D Objects package ({UPSTREAM_PACKAGE}, or PyPI's sam3d which vendors it) "
            f"is not installed: pip install -r {REQUIREMENTS_FILE} (or use "
            "docker/worker-gpu.Dockerfile, or scripts/gpu_bundle.py for an offline host)"
        )
    if importlib.util.find_spec("torch") is None:
        problems.append(
            f"the PyTorch package (torch) is not installed: pip install -r {REQUIREMENTS_FILE}"
        )
    if settings.attn_backend not in ATTENTION_CHOICES:
        problems.append(
            f"SAM3D_ATTN_BACKEND={settings.attn_backend!r}: choose one of "
            + ", ".join(ATTENTION_CHOICES)
        )
    elif settings.attn_backend in ("flash_attn", "xformers") and not importlib.util.find_spec(
        settings.attn_backend
    ):
        problems.append(
            f"SAM3D_ATTN_BACKEND={settings.attn_backend} but {settings.attn_backend} is not "
            "installed (auto uses PyTorch's varlen attention instead)"
        )
    gpu = _nvml_gpu(
        gpu_index if gpu_index is not None else int(os.environ.get("SAM3D_GPU_INDEX", "0"))
    )
    if isinstance(gpu, str):
        problems.append(gpu)
    else:
        free_gb = gpu["memory_free_mb"] / 1024
        if free_gb < settings.min_free_gpu_gb:
            problems.append(
                f"GPU {gpu['index']} ({gpu['name']}) has {free_gb:.1f} GB free; SAM 3D needs "
                f"{settings.min_free_gpu_gb:g} GB (SAM3D_MIN_FREE_GPU_GB overrides)"
            )
    if problems:
        raise PreflightError(problems)
    return gpu


def _nvml_gpu(index: int) -> dict[str, Any] | str:
    """The GPU's facts, or a sentence saying why there is no usable CUDA device."""
    from worker.gpu import gpu_status

    try:
        import pynvml  # noqa: F401
    except ImportError:
        return "no CUDA device: NVML (nvidia-ml-py) is not installed, so no NVIDIA GPU can be seen"
    status = gpu_status(index)
    if status is None:
        return f"no CUDA device: no NVIDIA driver answers, or there is no GPU {index}"
    return status
