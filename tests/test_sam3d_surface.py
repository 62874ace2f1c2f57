"""The upstream surface (worker/backends/surface.py) against the pinned upstream in
``.venv/upstream``: every listed name exists; a name that goes missing turns its fast path off
(reported, with a WARNING), never crashes; a default-path gap refuses to start. And the
fast paths as a live worker reports them: its heartbeat, then ``GET /v1/backends`` over HTTP
(a fixture backend stands in for SAM 3D, whose weights cannot run here). And what the backend
does with them: the chunk size from the free memory, ``generate_many``'s routing."""

from __future__ import annotations

import importlib
import logging

import pytest
from sam3d_client.http import Http
from service import make_stack
from upstream_stubs import pinned_upstream

from jobs.errors import ErrorCode
from jobs.settings import Settings
from worker.backends.sam3d import surface
from worker.backends.sam3d.tuning import Tuning

ALL_ON = {path: (True, "") for path in surface.FAST_PATHS}


@pytest.fixture(scope="module")
def upstream():
    with pinned_upstream():
        yield


def test_every_listed_name_exists_in_the_pinned_upstream(upstream):
    missing = [
        str(n) for names in surface.SURFACE.values() for n in names if not surface.resolves(n)
    ]
    assert missing == []
    paths = surface.check_names(ALL_ON)
    assert set(paths) == set(surface.FAST_PATHS)
    assert all(p.engaged and p.reason == "on" for p in paths.values())


def test_a_name_gone_from_upstream_turns_its_fast_path_off_with_a_warning(
    upstream, monkeypatch, caplog
):
    basic = importlib.import_module("sam3d_objects.model.backbone.tdfy_dit.modules.sparse.basic")
    monkeypatch.delattr(basic, "sparse_batch_broadcast")
    norm = importlib.import_module("sam3d_objects.model.backbone.tdfy_dit.modules.sparse.norm")
    monkeypatch.delattr(norm.SparseGroupNorm32, "forward")  # its own: the class's goes
    with caplog.at_level(logging.WARNING, logger="sam3d.worker"):
        paths = surface.check_names(ALL_ON)
    off = {name: p.reason for name, p in paths.items() if not p.engaged}
    assert set(off) == {"gathered_broadcasts", "row_group_norms"}
    assert "sparse_batch_broadcast" in off["gathered_broadcasts"]
    assert "SparseGroupNorm32.forward" in off["row_group_norms"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("gathered_broadcasts" in m and "sparse_batch_broadcast" in m for m in warned)
    assert paths["cfg_pairs"].engaged and paths["batched_flow"].engaged


def test_a_default_path_gap_refuses_to_start(upstream, monkeypatch):
    gaussian = importlib.import_module(
        "sam3d_objects.model.backbone.tdfy_dit.representations.gaussian.gaussian_model"
    )
    monkeypatch.delattr(gaussian.Gaussian, "get_opacity")
    with pytest.raises(surface.UpstreamSurfaceError) as info:
        surface.check_names(ALL_ON)
    assert info.value.code is ErrorCode.PREFLIGHT_FAILED
    assert "Gaussian.get_opacity" in info.value.message


def test_a_fast_path_off_by_the_settings_says_so_and_is_not_checked():
    looked_up: list[str] = []

    def resolve(name):
        looked_up.append(name.module)
        return True

    switches = {**ALL_ON, "compile_flow": (False, "off: SAM3D_COMPILE_FLOW=false")}
    paths = surface.check_names(switches, resolve=resolve)
    assert paths["compile_flow"].to_dict() == {
        "name": "compile_flow",
        "engaged": False,
        "reason": "off: SAM3D_COMPILE_FLOW=false",
    }
    compile_modules = {n.module for n in surface.SURFACE["compile_flow"]}
    assert not compile_modules & set(looked_up)


def test_the_backend_runs_a_fast_path_only_when_set_up_engaged_and_switched_on():
    from worker.backends.sam3d import Sam3dBackend

    backend = Sam3dBackend(Settings(cfg_pairs=True, batch_objects=False))
    assert backend.engaged("cfg_pairs") and not backend.engaged("batched_flow")  # settings only
    backend.fast_paths = {
        "cfg_pairs": surface.FastPath("cfg_pairs", False, "upstream lacks x"),
        "batched_flow": surface.FastPath("batched_flow", True, "on"),
    }
    assert not backend.engaged("cfg_pairs")  # found unusable at setup
    assert not backend.engaged("batched_flow")  # usable, but switched off
    backend.tuning = Tuning(batch_objects=True)
    assert backend.engaged("batched_flow")


def test_a_live_workers_fast_paths_are_in_get_backends(tmp_path):
    stack = make_stack(tmp_path)
    stack.start(wait=False)
    try:
        stack.start_worker(backend="fixture_backends:FastPathsInflate")
        stack.wait_ready(60)
        workers = Http(stack.url).json("GET", "/v1/backends")["workers"]
        assert [w["fast_paths"] for w in workers] == [
            [
                {"name": "cfg_pairs", "engaged": True, "reason": "on"},
                {"name": "row_group_norms", "engaged": False, "reason": "upstream lacks x"},
            ]
        ]
    finally:
        stack.stop()


def test_pipeline_parts_that_are_not_upstreams_own_turn_their_fast_paths_off(caplog):
    from types import SimpleNamespace

    engaged = {p: surface.FastPath(p, True, "on") for p in surface.FAST_PATHS}
    bare = SimpleNamespace(models={}, condition_embedders={})  # no generators, decoders, DINO
    with caplog.at_level(logging.WARNING, logger="sam3d.worker"):
        paths = surface.check_pipeline(bare, engaged)
    off = {name for name, p in paths.items() if not p.engaged}
    assert off == {"cfg_pairs", "mesh_trunks", "shared_image_rows", "compile_flow"}
    assert "guidance" in paths["cfg_pairs"].reason
    assert paths["gathered_broadcasts"].engaged  # no pipeline part to check: as it was
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 4


def test_chunks_follow_the_free_gpu_memory_or_the_setting(monkeypatch):
    import torch

    from worker.backends.sam3d import Sam3dBackend

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 2 * gib)  # 4 GiB cached, free
    backend = Sam3dBackend(Settings(gpu_reserve_gb=4.0, gpu_gb_per_object=2.0))
    assert backend.chunk_size(30) == 10  # (20 + 4 - 4) GiB / 2 GiB an object
    assert backend.chunk_size(3) == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1 * gib, 80 * gib))
    assert backend.chunk_size(8) == 1  # never below one object
    assert Sam3dBackend(Settings(max_batch_objects=3)).chunk_size(8) == 3


def test_generate_many_batches_only_what_its_fast_paths_allow(monkeypatch):
    """``generate_many``'s routing: several masks through the batched flow, with the chunk
    the memory holds and the fast paths found off passed down; one mask, or the batched flow
    off, through upstream's own run() per mask (the flow itself: test_sam3d_batch_flow)."""
    import numpy as np

    from worker.backends.sam3d import Sam3dBackend, flow, guidance

    calls: dict = {}

    def fake_rows(pipeline, images, rows, kwargs, **options):
        calls.update(options, count=len(rows), seeds=[row.seed for row in rows])
        yield from ((i, f"object {i}") for i in range(len(rows)))

    monkeypatch.setattr(flow, "generate_rows", fake_rows)
    paired: list[bool] = []

    def fake_pairs(pipeline, enabled=True):
        import contextlib

        paired.append(enabled)
        return contextlib.nullcontext([])

    monkeypatch.setattr(guidance, "cfg_pairs", fake_pairs)
    backend = Sam3dBackend(Settings(max_batch_objects=2))
    backend.fast_paths = {
        p: surface.FastPath(p, p != "row_group_norms", "on") for p in surface.FAST_PATHS
    }
    backend.generate = lambda image, mask, **kw: f"alone {kw['seed']}"
    image, masks = np.zeros((4, 4, 3), np.uint8), np.zeros((3, 4, 4), bool)
    out = list(backend.generate_many(image, masks, camera=None, seeds=[7, 8, 9], options={}))
    assert out == ["object 0", "object 1", "object 2"]
    assert calls["chunk_size"] == 2 and calls["count"] == 3 and calls["seeds"] == [7, 8, 9]
    assert calls["tuning"] is backend.tuning and "row_group_norms" in calls["disabled"]
    assert "cfg_pairs" not in calls["disabled"]
    one = list(backend.generate_many(image, masks[:1], camera=None, seeds=[5], options={}))
    assert one == ["alone 5"] and paired == [True]
    backend.fast_paths["batched_flow"] = surface.FastPath("batched_flow", False, "upstream lacks x")
    two = list(backend.generate_many(image, masks[:2], camera=None, seeds=[1, 2], options={}))
    assert two == ["alone 1", "alone 2"]
