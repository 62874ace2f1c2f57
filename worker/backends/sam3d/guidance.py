"""**CFG pairs in one call.** Upstream's classifier-free guidance calls the flow backbone twice
per guided step: once with the condition, once with it zeroed (``add_flag`` with
``force_zeros_cond``). Here both halves go through one backbone call: the latents twice along
the batch (stage 2: the packed voxels twice, the copy's batch indices shifted by the object
count) and the condition next to zeros. Same arithmetic, half the calls."""

from __future__ import annotations

import contextlib
import functools
import importlib

import numpy as np

from worker.backends.sam3d import patching
from worker.backends.sam3d.patching import Patch

_CFG_MODULE = "sam3d_objects.model.backbone.generator.classifier_free_guidance"


def pairable(cfg) -> bool:
    """Upstream's two-call guidance whose unconditional half is the condition zeroed."""
    module = importlib.import_module(_CFG_MODULE)
    return (
        type(cfg).inner_forward is module.ClassifierFreeGuidance.inner_forward
        and cfg.unconditional_handling == "add_flag"
        and bool(getattr(cfg.backbone, "force_zeros_cond", False))
    )


def _pack_dense(x, args_cond):
    """Stage 1: every latent twice along the batch; the condition, then zeros."""
    import torch

    cond, *rest = args_cond
    doubled = {k: torch.cat([v, v]) for k, v in x.items()} if isinstance(x, dict) else None
    if doubled is None:
        doubled = torch.cat([x, x])
    return doubled, (torch.cat([cond, torch.zeros_like(cond)]), *rest)


def _unpack_dense(y, count: int):
    if isinstance(y, dict):
        return {k: v[:count] for k, v in y.items()}, {k: v[count:] for k, v in y.items()}
    return y[:count], y[count:]


def _pack_sparse(x, args_cond, memo: dict | None = None):
    """Stage 2: the packed voxels twice, the copy's batch indices after the real objects'.
    ``memo``: the packed coordinates by the identity of the coordinates they pack, so every
    step gets the same array (``sparse`` builds the sparse structure once per array)."""
    import torch

    cond, coords = args_cond[0], args_cond[-1]
    objects = cond.shape[0]
    packed = memo.get(id(coords)) if memo is not None else None
    if packed is None or packed[0] is not coords:
        shifted = np.array(coords, copy=True)
        shifted[:, 0] += objects
        packed = (coords, np.concatenate([coords, shifted]))
        if memo is not None:
            memo[id(coords)] = packed  # holds ``coords``: its id stays its own
    args = (torch.cat([cond, torch.zeros_like(cond)]), *args_cond[1:-1])
    return torch.cat([x, x], dim=1), (*args, packed[1])


def _unpack_sparse(y, voxels: int):
    return y[:, :voxels], y[:, voxels:]


def _paired_inner_forward(cfg, pack, unpack, size):
    """``cfg.inner_forward`` with the conditional and unconditional calls as one."""

    def inner_forward(x, t, is_cond, strength, *args_cond, **kwargs_cond):
        if is_cond:
            return cfg.backbone(x, t, *args_cond, **kwargs_cond)
        x2, args2 = pack(x, args_cond)
        y_cond, y_uncond = unpack(cfg.backbone(x2, t, *args2, **kwargs_cond), size(x))
        return cfg._cfg_step(y_cond, y_uncond, strength)

    return inner_forward


@contextlib.contextmanager
def cfg_pairs(pipeline, enabled: bool = True):
    """Both generators' guided steps as one backbone call each (see the module docstring), on
    this pipeline's guidance instances only; yields the classes paired."""
    patches: list[Patch] = []
    if enabled:
        plans = {
            "ss_generator": (_pack_dense, _unpack_dense, _dense_size),
            "slat_generator": (
                functools.partial(_pack_sparse, memo={}),  # for this context only
                _unpack_sparse,
                lambda x: x.shape[1],
            ),
        }
        models = dict(getattr(pipeline, "models", {}))  # upstream's is a ModuleDict: no .get
        for name, (pack, unpack, size) in plans.items():
            cfg = getattr(models.get(name), "reverse_fn", None)
            if cfg is not None and pairable(cfg):
                paired = _paired_inner_forward(cfg, pack, unpack, size)
                patches.append(Patch(cfg, "inner_forward", paired, "cfg_pairs"))
    with patching.scoped(patches):
        yield [type(p.target).__name__ for p in patches]


def _dense_size(x) -> int:
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return first.shape[0]
