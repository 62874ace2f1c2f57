"""Two fast paths in upstream's sparse ops: per-object broadcasts as one gather
(``gathered_broadcasts``), and the mesh decoder's sparse group norms as column reductions
(``row_group_norms``). Each patches upstream through ``patching.scoped`` for as long as its
context lasts (one job's ``generate_outputs``); the names they need are in ``surface``.

(Stage 2's sparse structure built once per flow, an experiment measured without a gain, is
bench/reused_structure.py, patched in by bench/gpu.py's way ``ours-reuse``.)
"""

from __future__ import annotations

import contextlib
import importlib

from worker.backends.sam3d import patching
from worker.backends.sam3d.patching import Patch

_SPARSE_PACKAGE = "sam3d_objects.model.backbone.tdfy_dit.modules.sparse"


def consecutive_spans(layout) -> tuple[tuple[int, int], ...] | None:
    """A sparse tensor's layout (one slice of rows per object) as (start, stop) pairs where
    each object's rows follow the one before it's from row 0; else None."""
    spans = tuple((part.start or 0, part.stop) for part in layout)
    starts = [0] + [stop for _, stop in spans[:-1]]
    return spans if spans and [start for start, _ in spans] == starts else None


def gathered_broadcast(sparse, other, rows_cache: dict, fallback):
    """Upstream's ``sparse_batch_broadcast`` (a per-object ``[B, ...]`` tensor, ``other[k]``
    over object ``k``'s rows of ``sparse.feats``) as one gather, where upstream fills a zero
    tensor one object at a time: a copy kernel per object, six broadcasts per transformer
    block (the adaptive norm's scales, shifts and gates), 5,312 copies in stage 2 of 8 fast
    objects on the H200 (bench/gpu.py --profile). Same values: the features' dtype, rows
    past the layout zero. A layout that is not consecutive spans from row 0 goes to
    ``fallback`` (upstream's). ``rows_cache``: each layout's row-to-object index, built once
    (a flow keeps two layouts, 64^3 and 32^3, for all its blocks and steps)."""
    import torch

    feats = sparse.feats
    spans = consecutive_spans(sparse.layout)
    if not spans:
        return fallback(sparse, other)
    key = (spans, str(feats.device))
    rows = rows_cache.get(key)
    if rows is None:
        rows = rows_cache[key] = torch.repeat_interleave(
            torch.arange(len(spans), device=feats.device),
            torch.tensor([stop - start for start, stop in spans], device=feats.device),
        )
    out = other.to(feats.dtype).index_select(0, rows)
    if len(rows) < feats.shape[0]:  # rows past the last span
        out = torch.cat([out, out.new_zeros((feats.shape[0] - len(rows), *out.shape[1:]))])
    return out


def _sparse_module(name: str, enabled: bool):
    """Upstream's sparse submodule ``name`` when ``enabled`` and importable, else None."""
    if not enabled:
        return None
    try:
        return importlib.import_module(f"{_SPARSE_PACKAGE}.{name}")
    except ImportError:
        return None


@contextlib.contextmanager
def gathered_broadcasts(enabled: bool = True):
    """Within: upstream's sparse elementwise ops broadcast per-object tensors by one gather
    (``gathered_broadcast``). The name is module-wide in upstream's ``basic``: every thread
    gets it meanwhile, which is harmless (same values)."""
    basic = _sparse_module("basic", enabled)
    if basic is None:
        yield False
        return
    own = basic.sparse_batch_broadcast
    cache: dict = {}

    def broadcast(sparse, other):
        return gathered_broadcast(sparse, other, cache, own)

    with patching.scoped(
        [Patch(basic, "sparse_batch_broadcast", broadcast, "gathered_broadcasts")]
    ):
        yield True
    cache.clear()


def group_norm_rows(feats, layout, groups: int, weight, bias, eps: float):
    """GroupNorm of each object's rows of ``feats`` (``[N, C]``; object ``k``: the rows
    ``layout[k]``) in float32, as upstream's ``SparseGroupNorm`` computes it through PyTorch's
    ``group_norm`` on ``[1, C, n_k]``: each group's mean and variance over its channels and
    the object's rows, then ``x * a + b`` per channel. Returned in the features' dtype.

    Upstream's way runs the statistics as one row per group (``group_norm``'s moments kernel:
    32 thread blocks on a 132-SM GPU, 2.1 ms for a 320,000-voxel mesh tail on the H200) after
    two copies of the transposed features. Here each channel's mean and variance are one
    column reduction over the rows (Welford, float32), merged per group exactly (equal counts:
    the group's variance is its channels' variances' mean plus their means' spread)."""
    import torch

    channels = feats.shape[1]
    per = channels // groups
    out = torch.empty_like(feats)
    for part in layout:
        x = feats[part].float()
        var_c, mean_c = torch.var_mean(x, dim=0, correction=0)
        mean = mean_c.view(groups, per).mean(1, keepdim=True)
        var = (var_c.view(groups, per) + (mean_c.view(groups, per) - mean).square()).mean(1)
        scale = torch.rsqrt(var + eps).repeat_interleave(per)
        if weight is not None:
            scale = scale * weight.float()
        shift = -mean.view(groups).repeat_interleave(per) * scale
        if bias is not None:
            shift = shift + bias.float()
        out[part] = torch.addcmul(shift, x, scale)
    return out


def _group_norm_forward(own):
    """A ``SparseGroupNorm`` class's forward through ``group_norm_rows``, in the features'
    dtype; ``own`` where the layout is not consecutive, non-empty spans over all the rows
    (upstream leaves rows outside it zero) or the channels do not split into the groups."""

    def forward(module, x):
        feats, layout = x.feats, x.layout
        spans = consecutive_spans(layout)
        if (
            not spans
            or feats.dim() != 2
            or feats.shape[1] % module.num_groups
            or spans[-1][1] != feats.shape[0]
            or any(stop <= start for start, stop in spans)
        ):
            return own(module, x)
        out = group_norm_rows(
            feats, layout, module.num_groups, module.weight, module.bias, module.eps
        )
        return x.replace(out)

    return forward


@contextlib.contextmanager
def row_group_norms(enabled: bool = True):
    """Within: upstream's ``SparseGroupNorm32`` (the mesh decoder's upsampling blocks: four
    an object; float32, then the input's dtype) and ``SparseGroupNorm`` (the input's dtype;
    PyTorch's kernel computes half inputs in float32 too) through ``group_norm_rows``.
    Class-wide while it lasts, like ``gathered_broadcasts``."""
    norm = _sparse_module("norm", enabled)
    if norm is None:
        yield False
        return
    patches = [
        Patch(cls, "forward", _group_norm_forward(cls.__dict__["forward"]), "row_group_norms")
        for cls in (norm.SparseGroupNorm32, norm.SparseGroupNorm)
    ]
    with patching.scoped(patches):
        yield True
