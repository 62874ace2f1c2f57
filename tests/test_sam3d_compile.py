"""``SAM3D_COMPILE_FLOW`` (worker/backends/flow_compile.py) on the CPU: the blocks it finds and
how it wraps them. The model here is a stand-in of upstream's layout
(``models["ss_generator"].reverse_fn.backbone.blocks``), small blocks of the same call shape
(``block(h, t_emb, cond)``), because SAM 3D's weights and CUDA are not here; dynamo runs for
real, with its ``aot_eager`` backend (no C compiler). tests/test_sam3d_gpu.py compares the
real stage 1 compiled with inductor against it eager on the GPU."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")

from worker.backends.sam3d import flow_compile  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mod = torch.nn.Linear(width, 2 * width)
        self.mlp = torch.nn.Linear(width, width)

    def forward(self, h, t_emb, cond):
        scale, shift = self.mod(t_emb).chunk(2, dim=-1)
        x = h["shape"] * (1 + scale[:, None]) + shift[:, None] + cond.mean(1, keepdim=True)
        return {"shape": h["shape"] + self.mlp(torch.nn.functional.gelu(x))}


def pipeline(blocks: int = 3, width: int = 8):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(Block(width) for _ in range(blocks))
    backbone = types.SimpleNamespace(blocks=layers)
    generator = types.SimpleNamespace(reverse_fn=types.SimpleNamespace(backbone=backbone))
    return types.SimpleNamespace(models={"ss_generator": generator})


def run(pipe, batch: int, width: int = 8):
    g = torch.Generator().manual_seed(batch)
    h = {"shape": torch.randn(batch, 5, width, generator=g)}
    t_emb, cond = torch.randn(batch, width, generator=g), torch.randn(batch, 4, width, generator=g)
    with torch.no_grad():  # as upstream's sample_sparse_structure
        for block in pipe.models["ss_generator"].reverse_fn.backbone.blocks:
            h = block(h, t_emb, cond)
    return h["shape"]


def test_compiled_blocks_give_the_eager_output_for_every_batch_size():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = pipeline()
    eager = {batch: run(pipe, batch) for batch in (1, 2, 5)}
    assert flow_compile.compile_flow(pipe, backend="aot_eager") == 3
    for batch in (1, 2, 5):
        torch.testing.assert_close(run(pipe, batch), eager[batch])
    # One graph for all three blocks and batch 1; one more (the batch dimension dynamic) for 2
    # and 5: the worker's warm-up compiles both, so no job pays a compile.
    assert counters["stats"]["unique_graphs"] == 2
    assert sum(counters["graph_break"].values()) == 0


def test_the_patches_share_one_compiled_function_and_leave_the_class_alone():
    pipe = pipeline()
    first = flow_compile.flow_patches(pipe, backend="aot_eager")
    second = flow_compile.flow_patches(pipe, backend="aot_eager")
    blocks = list(pipe.models["ss_generator"].reverse_fn.backbone.blocks)
    assert [obj for obj, _, _ in first] == blocks
    assert {p.func for _, _, p in first + second} == {pipe._sam3d_jobs_compiled_block}
    assert all(name == "forward" and "forward" not in vars(b) for b, name, _ in first)


def test_eager_patches_undo_the_compile_while_they_hold():
    import contextlib
    from unittest import mock

    pipe = pipeline()
    eager = run(pipe, 3)
    flow_compile.compile_flow(pipe, backend="aot_eager")
    blocks = pipe.models["ss_generator"].reverse_fn.backbone.blocks
    with contextlib.ExitStack() as stack:
        for patch in flow_compile.eager_patches(pipe):
            stack.enter_context(mock.patch.object(*patch))
        assert all(vars(b)["forward"].func is Block.forward for b in blocks)
        torch.testing.assert_close(run(pipe, 3), eager)
    assert all(vars(b)["forward"].func is pipe._sam3d_jobs_compiled_block for b in blocks)


def test_a_pipeline_of_another_layout_is_left_eager():
    other = types.SimpleNamespace(models={"ss_generator": types.SimpleNamespace()})
    assert flow_compile.compile_flow(other) == 0
    assert flow_compile.compile_flow(types.SimpleNamespace()) == 0


def test_upstreams_own_compile_takes_the_place_of_ours():
    from jobs.settings import Settings
    from worker.backends.sam3d import Sam3dBackend

    assert Sam3dBackend(Settings()).settings.compile_flow is True  # the default
    both = Sam3dBackend(Settings(compile_model=True, compile_flow=True))
    assert both.settings.compile_model is True and both.settings.compile_flow is False
    env = Settings.from_env({"SAM3D_COMPILE_FLOW": "false"})
    assert Sam3dBackend(env).settings.compile_flow is False


def test_a_compile_that_fails_runs_eagerly_reports_once_and_changes_no_global_config(caplog):
    torch._dynamo.reset()
    pipe = pipeline()
    eager = run(pipe, 2)
    limit, suppress = torch._dynamo.config.cache_size_limit, torch._dynamo.config.suppress_errors

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no kernels today")

    reasons: list[str] = []
    with caplog.at_level("WARNING", logger="sam3d.worker"):
        assert flow_compile.compile_flow(pipe, backend=broken_backend, on_fallback=reasons.append)
        torch.testing.assert_close(run(pipe, 2), eager)  # every block: eager, same output
        torch.testing.assert_close(run(pipe, 3), run(pipeline(), 3))
    assert len(reasons) == 1 and "no kernels today" in reasons[0]
    assert sum("run eagerly" in r.getMessage() for r in caplog.records) == 1
    assert torch._dynamo.config.cache_size_limit == limit
    assert torch._dynamo.config.suppress_errors == suppress
