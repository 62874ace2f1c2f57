"""Guided flow steps as one backbone call (worker/backends/sam3d/flow.py ``cfg_pairs``).

Upstream's own classifier-free guidance classes run here on the CPU (PyPI's ``sam3d`` vendors
them; ``make test`` puts it, without its GPU dependencies, in ``.venv/upstream``, outside
site-packages, so the rest of the suite still sees a host without upstream). Their backbones
are small stand-ins with the two properties the pairing relies on, because the real flow
transformers need the weights and spconv: the unconditional half is the condition zeroed
(``force_zeros_cond`` with the ``cfg`` flag), and each object's output depends on its own
latents and condition only.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from worker.backends.sam3d import guidance as sam3d_guidance

VENDORED = Path(sys.prefix) / "upstream" / "sam3d" / "third_party" / "meta"


@pytest.fixture(scope="module")
def cfg_module():
    if not VENDORED.is_dir():
        pytest.fail(
            f"{VENDORED} is missing: make install-dev installs requirements/dev-upstream.txt"
        )
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")  # upstream's package import, without setup
    sys.path.insert(0, str(VENDORED))
    try:
        yield importlib.import_module(sam3d_guidance._CFG_MODULE)
    finally:
        sys.path.remove(str(VENDORED))
        for name in [n for n in sys.modules if n.split(".")[0] == "sam3d_objects"]:
            del sys.modules[name]  # the rest of the suite runs as on a host without upstream


class DenseBackbone(torch.nn.Module):
    """Stage 1's calling convention: a dict of [B, ...] latents, the condition [B, L, C]."""

    force_zeros_cond = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, latents, t, cond, cfg=False, d=None):
        if cfg:
            cond = cond * 0
        self.calls.append(cond.shape[0])
        gain = torch.tanh(cond.mean(dim=(1, 2)))[:, None, None]
        shift = cond.square().sum(dim=(1, 2))[:, None, None]
        return {k: v * (1 + gain) + shift + 1e-3 * t.reshape(-1)[0] for k, v in latents.items()}


class SparseBackbone(torch.nn.Module):
    """Stage 2's: packed voxels [1, N, C], the condition [B, L, C], coords (numpy) last."""

    force_zeros_cond = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, cond, coords, cfg=False):
        if cfg:
            cond = cond * 0
        self.calls.append(x.shape[1])
        batch = torch.from_numpy(np.asarray(coords)[:, 0]).long()
        gain = torch.tanh(cond.mean(dim=(1, 2)))[batch][None, :, None]
        return x * (1 + gain) + cond.square().sum(dim=(1, 2))[batch][None, :, None] + 1e-3 * t


def guidance(cfg_module, backbone, cls=None):
    cls = cls or cfg_module.ClassifierFreeGuidanceWithExternalUnconditionalProbability
    return cls(backbone, strength=2.0, unconditional_handling="add_flag", interval=[0, 500]).eval()


def pipeline_with(ss, slat):
    """Upstream's pipeline.models is a torch ModuleDict (which has no ``.get``): so here."""

    def generator(reverse_fn):
        module = torch.nn.Module()
        module.reverse_fn = reverse_fn
        return module

    return SimpleNamespace(
        models=torch.nn.ModuleDict(
            {"ss_generator": generator(ss), "slat_generator": generator(slat)}
        )
    )


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    objects = 3
    dense = {
        "shape": torch.randn(objects, 64, 8, generator=gen),
        "6drotation": torch.randn(objects, 1, 6, generator=gen),
    }
    cond = torch.randn(objects, 5, 16, generator=gen)
    counts = [7, 2, 11]
    coords = np.concatenate(
        [
            np.column_stack([np.full(n, b), np.arange(n * 3).reshape(n, 3)])
            for b, n in enumerate(counts)
        ]
    ).astype(np.int32)
    sparse = torch.randn(1, sum(counts), 8, generator=gen)
    return dense, cond, sparse, coords


@pytest.mark.parametrize("t", [100.0, 900.0], ids=["guided", "unguided"])
def test_paired_steps_equal_upstreams_two_calls(cfg_module, inputs, t):
    dense, cond, sparse, coords = inputs
    ss = guidance(cfg_module, DenseBackbone())
    slat = guidance(cfg_module, SparseBackbone())
    t = torch.tensor([t])
    want_ss = ss(dense, t, cond)
    want_slat = slat(sparse, t, cond, coords)
    guided = t.item() <= 500
    assert ss.backbone.calls == ([3, 3] if guided else [3])
    assert slat.backbone.calls == ([20, 20] if guided else [20])
    ss.backbone.calls.clear(), slat.backbone.calls.clear()

    with sam3d_guidance.cfg_pairs(pipeline_with(ss, slat)) as paired:
        assert len(paired) == 2
        got_ss = ss(dense, t, cond)
        got_slat = slat(sparse, t, cond, coords)
    # One call each, at twice the batch (stage 2: twice the voxels) where the step is guided.
    assert ss.backbone.calls == ([6] if guided else [3])
    assert slat.backbone.calls == ([40] if guided else [20])
    for key in want_ss:
        torch.testing.assert_close(got_ss[key], want_ss[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(got_slat, want_slat, rtol=0, atol=1e-6)
    assert "inner_forward" not in vars(ss) and "inner_forward" not in vars(slat)


def test_the_copy_of_each_voxel_carries_its_own_objects_index(inputs):
    _, cond, sparse, coords = inputs
    x2, (cond2, coords2) = sam3d_guidance._pack_sparse(sparse, (cond, coords))
    assert x2.shape == (1, 2 * len(coords), 8)
    assert cond2.shape[0] == 2 * cond.shape[0] and not cond2[3:].any()
    np.testing.assert_array_equal(coords2[: len(coords)], coords)
    np.testing.assert_array_equal(coords2[len(coords) :, 0], coords[:, 0] + 3)
    np.testing.assert_array_equal(coords2[len(coords) :, 1:], coords[:, 1:])
    assert (np.diff(coords2[:, 0]) >= 0).all()  # sorted by batch, as SparseTensor expects


def test_every_step_of_a_context_gets_the_same_packed_coordinates(inputs):
    """sparse builds stage 2's sparse structure once per coordinate array: the paired
    steps of one flow must hand the backbone one array, not a new copy a step."""
    _, cond, sparse, coords = inputs
    memo: dict = {}
    _, (_, first) = sam3d_guidance._pack_sparse(sparse, (cond, coords), memo)
    _, (_, again) = sam3d_guidance._pack_sparse(sparse, (cond, coords), memo)
    _, (_, fresh) = sam3d_guidance._pack_sparse(sparse, (cond, coords))
    assert again is first
    np.testing.assert_array_equal(first, fresh)
    other = coords.copy()
    _, (_, packed_other) = sam3d_guidance._pack_sparse(sparse, (cond, other), memo)
    assert packed_other is not first and len(memo) == 2


def test_guidance_of_another_kind_is_left_alone(cfg_module, inputs):
    dense, cond, _, _ = inputs
    pointmap = guidance(cfg_module, DenseBackbone(), cfg_module.PointmapCFG)
    zeros = cfg_module.ClassifierFreeGuidance(
        DenseBackbone(), strength=2.0, unconditional_handling="zeros", interval=[0, 500]
    ).eval()
    with sam3d_guidance.cfg_pairs(pipeline_with(pointmap, zeros)) as paired:
        assert paired == []
    own = object()
    compiled = guidance(cfg_module, DenseBackbone())
    compiled.inner_forward = own  # upstream's compile puts its compiled function here
    with sam3d_guidance.cfg_pairs(pipeline_with(compiled, zeros)) as paired:
        assert paired == ["ClassifierFreeGuidanceWithExternalUnconditionalProbability"]
        assert compiled.inner_forward is not own
    assert compiled.inner_forward is own
    with sam3d_guidance.cfg_pairs(pipeline_with(compiled, zeros), enabled=False) as paired:
        assert paired == []
