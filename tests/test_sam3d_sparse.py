"""The sparse fast paths (``worker.backends.sam3d.sparse``) on the CPU, and the experiment beside
them (bench/reused_structure.py): how its submanifold-convolution wrapper hands spconv's index
pairs from one flow step's tensor to the next one of the same coordinates. spconv here is a
hand-written stand-in (the real one is a CUDA build, and SAM 3D's weights are not here): it
keeps spconv's contract as its source has it (pairs reused when the input's ``indice_dict``
holds the layer's ``indice_key``; built pairs stored in a copy of that dict, on the output
only). tests/test_sam3d_gpu.py runs the real stage 2 both ways and compares them."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")

from bench import reused_structure as experiment  # noqa: E402
from worker.backends.sam3d import sparse  # noqa: E402


class FakeSpconvConv:
    """spconv's SubMConv3d as far as index reuse goes."""

    def __init__(self) -> None:
        self.kernel_size, self.dilation, self.subm = (3, 3, 3), (1, 1, 1), True
        self.indice_key = None
        self.built = 0

    def __call__(self, data):
        indice_dict = dict(data.indice_dict)  # spconv: input.indice_dict.copy()
        if self.indice_key is None or self.indice_key not in indice_dict:
            self.built += 1
            pairs = ("pairs of", data.indices)
            if self.indice_key is not None:
                indice_dict[self.indice_key] = pairs
        else:
            pairs = indice_dict[self.indice_key]
            assert pairs[1] is data.indices  # reused pairs are those of these coordinates
        return types.SimpleNamespace(indices=data.indices, indice_dict=indice_dict)


class Conv:
    """Upstream's SparseConv3d around it: ``x.data`` in, a tensor of the output data out."""

    def __init__(self) -> None:
        self.conv = FakeSpconvConv()

    def forward(self, x):
        return types.SimpleNamespace(data=self.conv(x.data))


def tensor(coords):
    """A flow step's sparse tensor on ``coords``: a fresh ``indice_dict``, as each step's is."""
    return types.SimpleNamespace(data=types.SimpleNamespace(indices=coords, indice_dict={}))


def test_pairs_are_built_once_per_coordinates_and_reused_by_later_steps():
    module = Conv()
    structures = experiment._Structures(sp=None)
    forward = experiment._conv_forward(module, structures, module.forward)
    coords, other = torch.zeros(5, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32)
    for _ in range(3):  # three steps, each a new tensor on the same coordinates
        out = forward(tensor(coords))
        assert module.conv.indice_key is None  # the layer is left as it was
    assert module.conv.built == 1
    assert structures.builds["pairs"] == 1 and structures.hits["pairs"] == 2
    # the next layer of the same step reuses them through spconv's own dict
    again = forward(types.SimpleNamespace(data=out.data))
    assert module.conv.built == 1 and again.data.indice_dict == out.data.indice_dict
    # other coordinates (the downsampled ones) get pairs of their own, never these
    forward(tensor(other))
    forward(tensor(other))
    assert module.conv.built == 2 and structures.builds["pairs"] == 2


def test_equal_but_distinct_coordinates_are_not_trusted():
    """Reuse goes by identity (the flow passes one array to every step): an equal copy is
    another tensor, which may have been changed in place, so its pairs are built."""
    module = Conv()
    structures = experiment._Structures(sp=None)
    forward = experiment._conv_forward(module, structures, module.forward)
    coords = torch.zeros(5, 4, dtype=torch.int32)
    forward(tensor(coords))
    forward(tensor(coords.clone()))
    assert module.conv.built == 2


def test_without_upstream_nothing_is_patched():
    pipeline = types.SimpleNamespace(models={})
    with experiment.reused_structure(pipeline) as cache:
        assert cache is None


def test_the_gathered_broadcast_spreads_each_objects_row_over_its_rows():
    """A per-object [B, C] tensor over a packed sparse tensor's rows (a stand-in with
    upstream's ``feats``/``layout``), as upstream's loop spreads it; the dtype is the
    features'; each layout's row index built once."""
    import types

    feats = torch.zeros(9, 3, dtype=torch.float16)
    other = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    packed = types.SimpleNamespace(feats=feats, layout=[slice(0, 2), slice(2, 7), slice(7, 8)])
    calls, cache = [], {}
    out = sparse.gathered_broadcast(packed, other, cache, fallback=lambda *a: calls.append(a))
    assert out.dtype == torch.float16 and out.shape == (9, 3) and not calls
    want = torch.zeros(9, 3, dtype=torch.float16)
    for k, rows in enumerate(packed.layout):
        want[rows] = other[k]
    assert torch.equal(out, want)  # row 8, past the layout, stays zero
    assert len(cache) == 1
    assert torch.equal(sparse.gathered_broadcast(packed, other, cache, None), want)
    gapped = types.SimpleNamespace(feats=feats, layout=[slice(0, 2), slice(3, 9)])
    sparse.gathered_broadcast(gapped, other[:2], cache, fallback=lambda *a: calls.append(a))
    assert len(calls) == 1  # not consecutive from row 0: upstream's own


def upstream_group_norm(norm: torch.nn.GroupNorm, feats, layout, dtype):
    """Upstream's ``SparseGroupNorm32`` as its source has it: the features in float32, each
    object's rows transposed to ``[1, C, n]`` through PyTorch's ``group_norm``, a zeroed
    tensor filled object by object, then the input's dtype."""
    x = feats.float()
    out = torch.zeros_like(x)
    for rows in layout:
        part = x[rows].permute(1, 0).reshape(1, x.shape[1], -1)
        out[rows] = norm(part).reshape(x.shape[1], -1).permute(1, 0)
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_group_norm_equals_upstreams_per_object_group_norm(dtype):
    """Objects of unequal sizes, channels far from zero mean (where a one-pass E[x^2] - E[x]^2
    would lose digits) and apart within their group: each object normalised on its own rows
    only, as upstream's loop does."""
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(8, 32, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(32, generator=gen))
    layout = [slice(0, 5), slice(5, 405), slice(405, 1405)]
    offsets = torch.tensor([300.0, -2.0, 40.0]).repeat_interleave(torch.tensor([5, 400, 1000]))
    spread = torch.linspace(-20, 20, 32)  # channels of a group apart: their means differ
    feats = (torch.randn(1405, 32, generator=gen) * 3 + offsets[:, None] + spread).to(dtype)
    got = sparse.group_norm_rows(feats, layout, 8, norm.weight, norm.bias, norm.eps)
    want = upstream_group_norm(norm, feats, layout, dtype)
    assert got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # each object is normalised by its own statistics: the first object's far offset is gone
    assert got[:5].float().mean().abs() < 2


class FakeSparse:
    """Upstream's SparseTensor as far as the norms go: ``feats``, ``layout``, ``replace``."""

    def __init__(self, feats, layout) -> None:
        self.feats, self.layout = feats, layout

    def replace(self, feats):
        return FakeSparse(feats, self.layout)


def test_the_norm_forward_falls_back_to_upstreams_where_the_layout_is_not_whole():
    norm = torch.nn.GroupNorm(4, 8)
    calls = []
    forward = sparse._group_norm_forward(lambda module, x: calls.append(x) or x)
    feats = torch.randn(10, 8)
    whole = FakeSparse(feats, [slice(0, 4), slice(4, 10)])
    out = forward(norm, whole)
    want = upstream_group_norm(norm, feats, whole.layout, feats.dtype)
    torch.testing.assert_close(out.feats, want, atol=1e-5, rtol=1e-5)
    assert not calls
    for layout in ([slice(0, 4), slice(5, 10)], [slice(0, 4)], [slice(0, 0), slice(0, 10)]):
        assert forward(norm, FakeSparse(feats, layout)) is not None
    assert len(calls) == 3  # a gap, rows past the layout, an empty object: upstream's own
    forward(torch.nn.GroupNorm(3, 9, affine=False), FakeSparse(torch.randn(4, 9), [slice(0, 4)]))
    assert len(calls) == 3  # affine=False: no weight or bias, still ours


def test_row_group_norms_patch_nothing_without_upstream():
    with sparse.row_group_norms(enabled=True) as patched:
        assert patched is False
