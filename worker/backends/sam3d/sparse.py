"""Stage 2's sparse structure built once per flow, not once per step (``reused_structure``);
per-object broadcasts as one gather (``gathered_broadcasts``); the mesh decoder's sparse group
norms as column reductions (``row_group_norms``).

Upstream's SLAT flow backbone gets the voxels' coordinates as a numpy array with every call
(one call per step; two for a guided step, one with CFG pairs) and rebuilds, every time, what
depends on them alone:

- the coordinates on the GPU (a copy from pageable host memory) and the sparse tensor's
  per-object layout (counted on the GPU, read back to the host);
- the downsampled voxels of its first io block (``unique`` over the voxel codes, read back);
- the index pairs of each of its eight submanifold convolutions (spconv's hash table and
  neighbour masks; spconv reuses them only under an ``indice_key``, which upstream's flow
  does not set, and only within one forward).

The voxels are stage 1's: they do not change between steps. Within ``reused_structure`` each
of those is built on the flow's first call and reused by every later call with the same
coordinates (the same numpy array: upstream passes one array to every step; CFG pairs pack
theirs once, ``guidance._pack_sparse``). Reused, not recomputed differently: the same
tensors go into the same kernels, so the flow's output is the same up to the kernels' own
run-to-run noise (tests/test_sam3d_gpu.py on the H200, 2026-12-03: 6.1e-4 and 7.0e-4 of the
largest latent, fast and default, against 6.2e-4 and 7.9e-4 between two runs rebuilt). Off
by default (``ENABLED``): the job time did not move.

Only upstream's own classes are patched (the backbone's wrapper, ``SparseDownsample``,
``SparseConv3d`` over spconv's submanifold convolution); anything else runs as it is. The
caches live for the context only; patched methods are restored on leaving it.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

# Read at call time. ``reused_structure``: off. Measured on the H200 (bench/gpu.py, random
# weights, shells, 2026-12-03, ways interleaved): 8 fast objects 3.44 s a job with it and
# 3.44 s without (5 rounds each; stage 2 1.38 against 1.36 s), and in another run 3.79
# against 3.85 s (3 rounds), 4 default objects 10.86 against 10.27 s (one round). What it
# saves (the profile: 0.12 s of io-block kernels in 8 fast objects' stage 2, index builds
# included) is below the noise, and it stands in for upstream's wrapper forward, so the
# wrapper stays upstream's until a measurement says otherwise (bench way ``ours-reuse``).
ENABLED = False
# ``gathered_broadcasts``: on (bench way ``ours-loop`` turns it off). Same job time in the
# same runs (3.43 s without it, 5 rounds; 3.45 against 3.58 s, 3 rounds), with one gather
# where upstream fills a zeroed tensor one object at a time (5,312 copy kernels in stage 2
# of a fast 8-object job), same values.
GATHERED = True
# ``row_group_norms``: on (bench way ``ours-upnorm`` turns it off). The mesh decoder's tails
# spent about 155 ms of their 648 ms of GPU time in upstream's group norms for 8 fast objects
# on the H200 (bench/gpu.py --profile 8 --profile-mode fast, 2026-12-04: the moments kernel
# 68 ms in 32 calls, the float32 copies around it 80 ms), and the tails end the job with the
# GPU 85-98 % busy. The job time with it: 3.55 s against 3.63 s without (4 rounds each,
# interleaved: 3.39-3.61 against 3.44-3.74), within the rounds' spread; same values within
# float32 rounding (tests/test_sam3d_upstream.py on the GPU, upstream's own class).
ROW_GROUP_NORMS = True
_FLOW_MODULE = "sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_flow"
_SPARSE_PACKAGE = "sam3d_objects.model.backbone.tdfy_dit.modules.sparse"


def slat_backbone(pipeline):
    """The SLAT flow's backbone (None if the pipeline's layout differs)."""
    generator = dict(getattr(pipeline, "models", {})).get("slat_generator")
    return getattr(getattr(generator, "reverse_fn", None), "backbone", None)


class _Structures:
    """What one flow's calls share, keyed by the identity of the coordinates it derives from
    (each entry holds its key object, so no id is reused while the cache lives)."""

    def __init__(self, sp) -> None:
        self.sp = sp
        self.templates: dict[int, tuple[Any, Any]] = {}  # id(numpy coords) -> (array, tensor)
        self.downsampled: dict[tuple, tuple[Any, Any, Any]] = {}  # -> (coords, output, idx)
        self.pairs: dict[str, tuple[Any, Any]] = {}  # indice key -> (coords, spconv's pairs)
        self.hits = {"template": 0, "downsample": 0, "pairs": 0}
        self.builds = {"template": 0, "downsample": 0, "pairs": 0}

    def sparse(self, coords, feats):
        """``feats`` on the sparse structure of ``coords`` (a numpy array), built once."""
        import torch

        entry = self.templates.get(id(coords))
        if entry is None or entry[0] is not coords:
            device_coords = torch.as_tensor(coords).to(feats.device)
            entry = (coords, self.sp.SparseTensor(feats=feats, coords=device_coords))
            self.templates[id(coords)] = entry
            self.builds["template"] += 1
            return entry[1]
        self.hits["template"] += 1
        return entry[1].replace(feats)


def _backbone_forward(backbone, structures: _Structures, base_forward):
    """Upstream's wrapper forward (``SLatFlowModelTdfyWrapper.forward``: the coordinates last
    among the condition arguments or as ``coords``, ``d`` for shortcut models, ``cfg`` to
    zero the condition) with the sparse tensor from ``structures``."""

    def forward(x, t, *condition_args, **condition_kwargs):
        d = condition_kwargs.pop("d", None)
        if "coords" in condition_kwargs:
            coords = condition_kwargs.pop("coords")
        else:
            coords, condition_args = condition_args[-1], condition_args[:-1]
        sparse = structures.sparse(coords, x[0])
        cfg_activate = condition_kwargs.pop("cfg", False)
        cond = backbone.condition_embedder(*condition_args, **condition_kwargs)
        if backbone.force_zeros_cond and cfg_activate:
            cond = cond * 0
        return base_forward(backbone, sparse, t, cond, d).feats[None]

    return forward


def _downsample_forward(module, structures: _Structures, own_forward):
    """``SparseDownsample`` (mean pooling by ``factor``) with its voxel codes computed once per
    input structure: upstream's forward the first time; after that its output's coordinates
    and each input voxel's target row again, the features pooled the same way."""
    import torch

    def forward(x):
        coords = x.coords
        key = (id(coords), str(module.factor))
        entry = structures.downsampled.get(key)
        if entry is None or entry[0] is not coords:
            out = own_forward(x)
            factor = _factor(module, coords)
            idx = out.get_spatial_cache(f"upsample_{factor}_idx")
            if idx is not None:
                structures.downsampled[key] = (coords, out, idx)
                structures.builds["downsample"] += 1
            return out
        structures.hits["downsample"] += 1
        _, first, idx = entry
        feats = x.feats
        rows, width = first.feats.shape[0], feats.shape[1]
        pooled = torch.zeros(rows, width, device=feats.device, dtype=feats.dtype)
        pooled = torch.scatter_reduce(
            pooled, 0, idx.unsqueeze(1).expand(-1, width), feats, reduce="mean"
        )
        out = first.replace(pooled)
        out._spatial_cache = x._spatial_cache
        factor = _factor(module, coords)
        out.register_spatial_cache(f"upsample_{factor}_coords", coords)
        out.register_spatial_cache(f"upsample_{factor}_layout", x.layout)
        out.register_spatial_cache(f"upsample_{factor}_idx", idx)
        return out

    return forward


def _factor(module, coords) -> tuple:
    dims = coords.shape[-1] - 1
    return module.factor if isinstance(module.factor, tuple) else (module.factor,) * dims


def _conv_forward(module, structures: _Structures, own_forward):
    """A submanifold ``SparseConv3d`` whose index pairs are built once per coordinate tensor:
    spconv's own reuse (an ``indice_key``), with the key naming that tensor, and the pairs
    handed to the next step's tensor of the same coordinates."""
    conv = module.conv

    def forward(x):
        data = x.data
        coords = data.indices
        key = f"sam3d-jobs:{id(coords)}:{conv.kernel_size}:{conv.dilation}"
        entry = structures.pairs.get(key)
        reused = entry is not None and entry[0] is coords
        if reused:
            if key not in data.indice_dict:
                data.indice_dict[key] = entry[1]
            structures.hits["pairs"] += 1
        conv.indice_key = key
        try:
            out = own_forward(x)
        finally:
            conv.indice_key = None
        if not reused:
            pairs = out.data.indice_dict.get(key)
            if pairs is not None:
                structures.pairs[key] = (coords, pairs)
                structures.builds["pairs"] += 1
        return out

    return forward


def patches(pipeline, structures: _Structures) -> list[tuple[Any, str, Any]]:
    """(object, "forward", replacement) for the SLAT backbone and its io blocks' downsampling
    and submanifold convolutions, where they are upstream's classes unchanged."""
    backbone = slat_backbone(pipeline)
    if backbone is None:
        return []
    try:
        flow = importlib.import_module(_FLOW_MODULE)
    except ImportError:
        return []
    sp = structures.sp
    if type(backbone).forward is not flow.SLatFlowModelTdfyWrapper.forward:
        return []
    out: list[tuple[Any, str, Any]] = [
        (backbone, "forward", _backbone_forward(backbone, structures, flow.SLatFlowModel.forward))
    ]
    io_blocks = [*getattr(backbone, "input_blocks", []), *getattr(backbone, "out_blocks", [])]
    for block in io_blocks:
        for module in block.modules():
            own = getattr(type(module), "forward", None)
            conv = getattr(module, "conv", None)
            if own is sp.SparseDownsample.forward:
                wrap = _downsample_forward
            elif (
                own is sp.SparseConv3d.forward
                and getattr(conv, "subm", False)
                and getattr(conv, "indice_key", None) is None
            ):
                wrap = _conv_forward
            else:
                continue
            out.append((module, "forward", wrap(module, structures, module.forward)))
    return out


@contextlib.contextmanager
def reused_structure(pipeline, enabled: bool | None = None):
    """Within: stage 2's sparse structure built once per flow (module docstring). Yields the
    cache (its ``hits`` and ``builds`` counts), or None where nothing was patched.
    ``enabled``: None reads ``ENABLED``."""
    if not (ENABLED if enabled is None else enabled):
        yield None
        return
    try:
        sp = importlib.import_module(_SPARSE_PACKAGE)
    except ImportError:
        yield None
        return
    structures = _Structures(sp)
    applied = patches(pipeline, structures)
    before = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in applied]
    for obj, name, value in applied:
        obj.__dict__[name] = value
    try:
        yield structures if applied else None
    finally:
        for obj, name, own in before:
            if own is None:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = own
        structures.templates.clear()
        structures.downsampled.clear()
        structures.pairs.clear()


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
def gathered_broadcasts(enabled: bool | None = None):
    """Within: upstream's sparse elementwise ops broadcast per-object tensors by one gather
    (``gathered_broadcast``). The name is module-wide in upstream's ``basic``: every thread
    gets it meanwhile, which is harmless (same values). ``enabled``: None reads
    ``GATHERED``."""
    basic = _sparse_module("basic", GATHERED if enabled is None else enabled)
    if basic is None:
        yield False
        return
    own = basic.sparse_batch_broadcast
    cache: dict = {}

    def broadcast(sparse, other):
        return gathered_broadcast(sparse, other, cache, own)

    basic.sparse_batch_broadcast = broadcast
    try:
        yield True
    finally:
        basic.sparse_batch_broadcast = own
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
def row_group_norms(enabled: bool | None = None):
    """Within: upstream's ``SparseGroupNorm32`` (the mesh decoder's upsampling blocks: four
    an object; float32, then the input's dtype) and ``SparseGroupNorm`` (the input's dtype;
    PyTorch's kernel computes half inputs in float32 too) through ``group_norm_rows``.
    Class-wide while it lasts, like ``gathered_broadcasts``. ``enabled``: None reads
    ``ROW_GROUP_NORMS``."""
    norm = _sparse_module("norm", ROW_GROUP_NORMS if enabled is None else enabled)
    if norm is None:
        yield False
        return
    owns = {cls: cls.__dict__["forward"] for cls in (norm.SparseGroupNorm32, norm.SparseGroupNorm)}
    for cls, own in owns.items():
        cls.forward = _group_norm_forward(own)
    try:
        yield True
    finally:
        for cls, own in owns.items():
            cls.forward = own
