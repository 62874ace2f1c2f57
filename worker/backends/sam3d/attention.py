"""flash-attn's call signatures on PyTorch's own kernels, for hosts without flash-attn.

Upstream's sparse attention (``modules/sparse/attention``) packs every object's voxels into one
sequence and, without flash-attn or xformers, runs SDPA with a dense block-diagonal mask:
memory and time quadratic in the *total* voxel count. With this adapter in place of the
``flash_attn`` module those calls become ``torch.nn.attention.varlen.varlen_attn`` (variable
length, no mask; PyTorch >= 2.9) or, on older torch, one SDPA call per sequence. PyPI's
flash-attn ships as an sdist that needs a CUDA build; this needs nothing.

Shapes follow flash-attn 2: packed varlen tensors are ``[T, H, C]`` (``qkv``: ``[T, 3, H, C]``,
``kv``: ``[T, 2, H, C]``) with ``cu_seqlens`` int32 offsets; dense ones ``[B, L, H, C]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import threading
from typing import Any

import torch
import torch.nn.functional as F

try:  # PyTorch >= 2.9
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None

HALF = (torch.float16, torch.bfloat16)
# Long sequences (few of them) go one SDPA call each: cuDNN's flash kernel beats varlen
# from ~3,500 tokens on (docs/perf/2026-12-04-sam3d-knobs.md). 0: off.
PER_SEQUENCE_MIN_LEN = 3500
PER_SEQUENCE_MAX_COUNT = 64
# cuDNN plans a new length on the host while the GPU waits: only flows of this many steps
# reuse a plan enough to pay for it (fast mode's 4 keep varlen).
PER_SEQUENCE_MIN_STEPS = 10
# (cuDNN's ragged kernel was tried instead of varlen and rebuilt its plan every call: not kept.)
# FLOPs of the varlen calls while a benchmark counts them (torch's FlopCounterMode has no
# formula for the varlen kernel): None, or a one-item list to add to.
flop_tally: list[float] | None = None


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, C] attention through SDPA (which picks its flash kernel for half inputs)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a, **kw) -> torch.Tensor:
    return _dense(q, k, v)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, *a, **kw) -> torch.Tensor:
    return _dense(q, kv[:, :, 0], kv[:, :, 1])


def flash_attn_qkvpacked_func(qkv: torch.Tensor, *a, **kw) -> torch.Tensor:
    return _dense(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *a: Any,
    **kw: Any,
) -> torch.Tensor:
    """Packed variable-length attention: sequence i is rows cu[i]:cu[i+1] of q, k and v."""
    if flop_tally is not None:  # QK^T and PV: 2 * 2 * Lq * Lk * C per head and sequence
        lq, lk = cu_seqlens_q.diff().double(), cu_seqlens_k.diff().double()
        heads, dim = q.shape[-2], q.shape[-1]
        flop_tally[0] += float(4 * (lq * lk).sum()) * heads * dim
    if per_sequence(q, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k):
        return _varlen_by_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if _varlen_attn is not None and q.is_cuda:
        dtype = q.dtype
        if dtype not in HALF:  # the kernel takes half precision only
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        out = _varlen_attn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            cu_seqlens_q.to(torch.int32),
            cu_seqlens_k.to(torch.int32),
            int(max_seqlen_q),
            int(max_seqlen_k),
        )
        return out.to(dtype)
    return _varlen_by_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k)


def per_sequence(q: torch.Tensor, sequences: int, max_q: int, max_k: int) -> bool:
    """Whether a varlen call goes one SDPA call per sequence (else one varlen kernel)."""
    return (
        q.is_cuda
        and q.dtype in HALF
        and PER_SEQUENCE_MIN_LEN > 0
        and not getattr(_flow, "varlen_only", False)
        and sequences <= PER_SEQUENCE_MAX_COUNT
        and min(max_q, max_k) >= PER_SEQUENCE_MIN_LEN
    )


# The sequence lengths of the sparse attention call in progress on this thread, as upstream's
# caller knows them on the host (``hinted``): reading them back from ``cu_seqlens`` instead
# would stall the GPU queue once per call.
_lengths = threading.local()


# The flow in progress on this thread (``for_steps``).
_flow = threading.local()


@contextlib.contextmanager
def for_steps(steps: int | None):
    """Within, on this thread: the attention of a flow of ``steps`` steps (None: unknown, as
    before). Fewer than ``PER_SEQUENCE_MIN_STEPS``: every call one varlen kernel."""
    previous = getattr(_flow, "varlen_only", False)
    _flow.varlen_only = steps is not None and steps < PER_SEQUENCE_MIN_STEPS
    try:
        yield
    finally:
        _flow.varlen_only = previous


def _seqlens(x) -> list[int]:
    layout = getattr(x, "layout", None)  # a SparseTensor's: one slice per object
    if isinstance(layout, list):
        return [part.stop - part.start for part in layout]
    return [x.shape[1]] * x.shape[0]  # dense [N, L, ...]


def hinted(fn):
    """Upstream's ``sparse_scaled_dot_product_attention`` that first notes the host-side
    lengths of its query and key sequences for ``_varlen_by_sequence``."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        tensors = [*args, *kwargs.values()]
        if len(tensors) in (1, 2, 3):
            _lengths.value = (_seqlens(tensors[0]), _seqlens(tensors[-1]))
        try:
            return fn(*args, **kwargs)
        finally:
            _lengths.value = None

    return call


def _bounds(cu: torch.Tensor, lengths: list[int] | None, longest: int) -> list[int]:
    """``cu``'s offsets from the noted lengths where they match it, else read back."""
    if lengths is not None and len(lengths) == cu.numel() - 1 and max(lengths) == longest:
        return list(itertools.accumulate(lengths, initial=0))
    return cu.tolist()


def _varlen_by_sequence(q, k, v, cu_q, cu_k, max_q: int = -1, max_k: int = -1) -> torch.Tensor:
    """One SDPA call per sequence (linear memory, unlike a block-diagonal mask)."""
    noted = getattr(_lengths, "value", None) or (None, None)
    bounds_q = _bounds(cu_q, noted[0], int(max_q))
    bounds_k = _bounds(cu_k, noted[1], int(max_k))
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    for i in range(len(bounds_q) - 1):
        sq = slice(bounds_q[i], bounds_q[i + 1])
        sk = slice(bounds_k[i], bounds_k[i + 1])
        out[sq] = _dense(q[None, sq], k[None, sk], v[None, sk])[0]
    return out


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_q, max_k, *a, **kw):
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_q, max_k)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *a, **kw):
    return flash_attn_varlen_func(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen
    )


# Where upstream's attention layers call sparse_scaled_dot_product_attention (``hinted``).
ATTENTION_CALLERS = "sam3d_objects.model.backbone.tdfy_dit.modules.sparse.attention.modules"
SPARSE_MODULES = (
    "sam3d_objects.model.backbone.tdfy_dit.modules.sparse.attention.full_attn",
    "sam3d_objects.model.backbone.tdfy_dit.modules.sparse.attention.windowed_attn",
    "sam3d_objects.model.backbone.tdfy_dit.modules.sparse.attention.serialized_attn",
)


def install_into_upstream() -> list[str]:
    """Point upstream's sparse attention modules at this adapter, for the process's life (a
    setup-time patch: ``patching.process_wide``); returns the modules patched.

    Each module picks its branch from a module-level ``ATTN`` read at call time and calls
    ``flash_attn.<function>``; both names are rebound here, nothing else is touched.
    """
    import sys

    from worker.backends.sam3d import patching
    from worker.backends.sam3d.patching import Patch

    adapter = sys.modules[__name__]
    patches, patched = [], []
    for name in SPARSE_MODULES:
        module = importlib.import_module(name)
        patches.append(Patch(module, "flash_attn", adapter, "varlen_attention", create=True))
        patches.append(Patch(module, "ATTN", "flash_attn", "varlen_attention"))
        patched.append(name.rsplit(".", 1)[-1])
    callers = importlib.import_module(ATTENTION_CALLERS)
    own = callers.sparse_scaled_dot_product_attention
    if not getattr(own, "_hinted", False):
        wrapped = hinted(own)
        wrapped._hinted = True
        patches.append(
            Patch(callers, "sparse_scaled_dot_product_attention", wrapped, "varlen_attention")
        )
    patching.process_wide(patches)
    return patched
