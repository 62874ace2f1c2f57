"""The real model on a GPU: seconds per stage and peak memory, default and fast mode; and
upstream's per-mask loop against our batched generation, in one run on the same weights.

    python bench/gpu.py --checkpoint DIR [--image samples/shapes.jpg] [--repeat 2] [--json OUT]
        [--compare 1,4,8] [--ways upstream,ours,...] [--modes default,fast]
        [--stages/--no-stages] [--flops] [--profile 1,4 [--profile-mode default]]

Builds the ``sam3d`` backend exactly as the worker does (preflight, offline config, attention
choice, warm-up), then times one object per mode: upstream's stages (MoGe pointmap, stage 1
sparse structure, stage 2 SLAT flow, decoders, to_glb), our conversion to the documented
frames, export (GLB + PLY) and upload (file:// storage). Each stage is timed with the device
synchronised on both sides; peak memory is torch's allocator peak for the whole object.
With a random-weights checkpoint (scripts/sam3d_random_checkpoint.py) times and memory are the
real model's; only the assets are noise.

``--compare N,...``: jobs of N objects (the sample's masks, then ellipses on a grid), each run
(a) as upstream and the seed's integration do it, ``run()`` once per mask, and (b) through the
backend's batched ``generate_many`` (``--ways`` adds ours with one setting off, to see what
each part gives); all convert every object. Objects per second, seconds per job, peak memory
and the seconds of stage 1, stage 2 and the decoders, side by side. ``--profile N,...``:
torch.profiler over a job of N objects: how busy the GPU is, and the top kernels and CPU ops.
``--flops``: each stage's FLOPs counted once by torch's
FlopCounterMode on one object (untimed), over its timed seconds: achieved TFLOP/s against the
H200's ~790 dense bf16 (ops without a FLOP formula, such as spconv, count zero).

``--segmenter sam3``: the prompt segmenter (worker/segmenters/sam3.py, PyPI ``sam3``) built as
the worker builds it, beside SAM 3D (kept resident from ``--checkpoint``), with random weights
unless ``SAM3D_SAM3_CHECKPOINT`` is set; then, per image, seconds for ``--prompts`` 1, 8 and 64
boxes (one batched call), clicks, boxes with clicks, and one text prompt, and the peak GPU
memory of each beside what SAM 3D holds. ``--segmenter-only`` skips SAM 3D's own benches:

    python bench/gpu.py --checkpoint DIR --segmenter sam3 --segmenter-only [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jobs.images import decode_image  # noqa: E402
from jobs.masks import decode_masks  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from jobs.storage import FileStorage  # noqa: E402
from worker.assets import glb, ply  # noqa: E402

# Upstream pipeline methods, in the order one object runs through them.
STAGES = {
    "moge": "compute_pointmap",
    "stage1": "sample_sparse_structure",
    "stage2": "sample_slat",
    "decoders": "decode_slat",
    "to_glb": "postprocess_slat_output",
}
MODES = {"default": {}, "fast": {"fast": True}}


class StageClock:
    """Wraps the pipeline's stage methods; each call adds its synchronised seconds."""

    def __init__(self, pipeline) -> None:
        import torch

        self.torch = torch
        self.seconds: dict[str, float] = {}
        for stage, method in STAGES.items():
            original = getattr(pipeline, method)
            setattr(pipeline, method, self._timed(stage, original))

    def _timed(self, stage, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # Off the main thread (our post-processing threads) a device-wide sync would wait
            # for the main thread's queued GPU work: there only the thread's own time counts.
            sync = threading.current_thread() is threading.main_thread()
            if sync:
                self.torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                with self.torch.profiler.record_function(f"stage:{stage}"):
                    return fn(*args, **kwargs)
            finally:
                if sync:
                    self.torch.cuda.synchronize()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

        return wrapper

    def measure(self, stage: str, fn, *args, **kwargs):
        wrapped = self._timed(stage, fn)
        return wrapped(*args, **kwargs)


def one_object(backend, clock: StageClock, image, mask, options, storage) -> dict:
    import torch

    clock.seconds = {}
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    output = backend._run(image, mask, options)
    clock.torch.cuda.synchronize()
    model_s = time.perf_counter() - t0
    from worker.backends.sam3d import convert_output

    result = clock.measure("convert", convert_output, output, image.shape[:2])
    files = clock.measure(
        "export",
        lambda: {
            "o.glb": glb.export_mesh_glb(result.mesh),
            "o.ply": ply.export_splat_ply(result.gaussians),
        },
    )

    def upload():
        for name, data in files.items():
            storage.put(f"bench/{name}", data, content_type="application/octet-stream")

    clock.measure("upload", upload)
    row = dict(clock.seconds)
    row["run_total"] = model_s
    row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["voxels"] = int(output["coords"].shape[0])
    row["splats"] = len(result.gaussians)
    row["faces"] = len(result.mesh.faces)
    row["mb"] = sum(len(d) for d in files.values()) / 2**20
    return row


def job_masks(image: np.ndarray, base: np.ndarray, count: int) -> np.ndarray:
    """``count`` masks: the sample's own first, then ellipses on a grid over the image."""
    height, width = image.shape[:2]
    masks = list(base[:count])
    yy, xx = np.mgrid[:height, :width]
    cells = int(np.ceil(np.sqrt(max(count - len(masks), 1))))
    k = 0
    while len(masks) < count:
        cy = (k // cells + 0.5) * height / cells
        cx = (k % cells + 0.5) * width / cells
        ry, rx = 0.35 * height / cells, 0.25 * width / cells
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
        k += 1
    return np.stack(masks)


def compare_plan(spec: str, modes: list[str]) -> list[tuple[str, int]]:
    """``1,4,8`` (every mode) or ``fast:1,4,8;default:1,4`` -> [(mode, objects), ...]."""
    if ":" not in spec:
        return [(mode, int(c)) for mode in modes for c in spec.split(",")]
    plan = []
    for part in spec.split(";"):
        mode, counts = part.split(":")
        plan += [(mode, int(c)) for c in counts.split(",")]
    return plan


WAYS = {
    "upstream": "run() once per mask, as upstream and the seed's integration do",
    "ours": "generate_many: objects batched, guided steps paired, stage 1's blocks compiled "
    "(the worker's defaults)",
    "ours-eager": "generate_many with SAM3D_COMPILE_FLOW=false (stage 1's blocks eager)",
    "ours-nopairs": "generate_many with SAM3D_CFG_PAIRS=false",
    "ours-1thread": "generate_many with SAM3D_POSTPROCESS_THREADS=1",
    "ours-varlen": "generate_many with every sparse attention call as one varlen kernel (FA2)",
    "ours-parts": "generate_many, a chunk of 8+ in two parts (flows beside decoders)",
    "ours-inline": "generate_many with SAM3D_DECODER_STREAMS=0 (decoded in turn, in the caller)",
    "ours-0.5ms": "generate_many with a 0.5 ms GIL switch interval (Python's: 5 ms)",
    "ours-group": "generate_many with mesh-tail calls of several objects (up to 42k voxels)",
    "ours-1stream": "generate_many with SAM3D_DECODER_STREAMS=1 (one decoder call at a time)",
    "ours-3streams": "generate_many with SAM3D_DECODER_STREAMS=3",
    "ours-4streams": "generate_many with SAM3D_DECODER_STREAMS=4",
    "ours-percall": "generate_many with each decoder call one object through decode_slat",
    "ours-sdpa5k": "generate_many with one SDPA call per sequence from 5,000 tokens (not 3,500)",
    "ours-sdpa": "per-sequence SDPA at any step count (its cuDNN plans built every job)",
    "ours-compile": "stage 1's flow blocks compiled (SAM3D_COMPILE_FLOW; ours has it already)",
    "ours-dupe": "the full photo encoded by DINO once per object, as upstream's batch would "
    "(ours: once per part, image_rows.shared_image_rows)",
    "ours-loop": "upstream's per-object broadcast in sparse elementwise ops, one copy an "
    "object (ours: one gather, sparse.gathered_broadcasts)",
    "ours-reuse": "stage 2's sparse structure built once per flow, not at every backbone call "
    "as upstream's (bench/reused_structure.py, an experiment; not in ours)",
    "ours-upnorm": "the mesh tails' group norms as upstream's (one moments row per group; "
    "ours: column reductions, sparse.row_group_norms)",
    "ours-pageable": "outputs copied to the host from pageable memory (tensor.cpu()), not "
    "through page-locked buffers",
}


SHELL_RADIUS = 0.38  # of the grid's side


def shell_coords(count: int, size: int = 64, device=None):
    """``count`` voxels of a centred spherical shell in a ``size``^3 grid: the nearest to
    radius ``SHELL_RADIUS * size``, so the shell is as thick as the count needs."""
    import torch

    axis = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    r = torch.sqrt(x**2 + y**2 + z**2)
    order = torch.argsort((r - SHELL_RADIUS * size).abs().flatten(), stable=True)[:count]
    return torch.stack(torch.unravel_index(order, (size,) * 3), dim=1).int()


def use_shell_voxels(pipeline) -> None:
    """After stage 1, each object's voxels become a shell of the same count (same cost up to
    stage 1; realistic geometry after it). Random weights scatter stage 1's voxels over the
    grid, which no real object does: the SLAT flow's 2x patch merge then merges nothing, so
    its attention sees ~4x the tokens a real surface of that many voxels gives (16x the cost)."""
    import torch

    original = pipeline.sample_sparse_structure

    @functools.wraps(original)
    def shells(*args, **kwargs):
        out = original(*args, **kwargs)
        coords = out["coords"]
        parts = []
        for b in torch.unique(coords[:, 0]).tolist():
            n = int((coords[:, 0] == b).sum())
            xyz = shell_coords(n, device=coords.device)
            parts.append(torch.cat([torch.full_like(xyz[:, :1], b), xyz], dim=1))
        out["coords"] = torch.cat(parts).to(coords.dtype)
        return out

    pipeline.sample_sparse_structure = shells


def shell_sdf(coords, corners, res: int, radius: float = SHELL_RADIUS):
    """Signed distances (N x 8, negative inside) from the sphere that ``shell_coords`` puts
    its voxels around to the 8 corners (``corners``, 8 x 3, in the extractor's order) of each
    of the ``coords`` (N x 3 cube indices of a ``res``^3 grid over the unit cube)."""
    points = (coords[:, None, :].float() + corners[None].float()) / res - 0.5
    return points.norm(dim=-1) - radius


def use_shell_surfaces(pipeline) -> None:
    """The mesh decoder's SDF (its output's 8 corner values per cube) becomes the distance to
    the voxel shell's sphere (see ``use_shell_voxels``), so FlexiCubes extracts a surface of
    a real object's size. Random weights' SDF changes sign all over the voxels: a mesh of
    ~2 million vertices where a real object has ~0.1 million (REFERENCE-SAM3D), so the
    per-object mesh extraction, host copies and GLB conversion cost ~20x what they would.
    The decoder's own work (its trunk, upsampling, output layer) is unchanged."""
    from sam3d_objects.model.backbone.tdfy_dit.representations.mesh import utils_cube

    decoder = pipeline.models["slat_decoder_mesh"]
    extractor = decoder.mesh_extractor
    start, stop = extractor.layouts["sdf"]["range"]
    layer = decoder.out_layer
    original = layer.forward
    corners = utils_cube.cube_corners.to(layer.weight.device)  # once, not per call

    @functools.wraps(original)
    def forward(x):
        out = original(x)
        feats = out.feats.clone()
        feats[:, start:stop] = shell_sdf(out.coords[:, 1:], corners, extractor.res).to(feats.dtype)
        return out.replace(feats)

    layer.forward = forward


def run_way(backend, way: str, image, masks, options) -> None:
    """One job of ``masks`` the given way, every object converted to our ObjectResult."""
    import dataclasses
    from unittest import mock

    from worker.backends.sam3d import (
        attention,
        convert_output,
        decoders,
        flow_compile,
    )

    # Each way's knobs: fields of the backend's Tuning (worker/backends/sam3d/tuning.py).
    changes = {
        "ours-nopairs": {"cfg_pairs": False},
        "ours-1thread": {"postprocess_threads": 1},
        "ours-1stream": {"decoder_streams": 1},
        "ours-3streams": {"decoder_streams": 3},
        "ours-4streams": {"decoder_streams": 4},
        "ours-inline": {"decoder_streams": 0},
        "ours-parts": {"pipeline_min_part": 4},
        "ours-0.5ms": {"switch_interval_s": 0.0005},
        "ours-group": {"decoder_group_voxels": decoders.MESH_DECODER_MAX_VOXELS},
        "ours-percall": {"batched_trunks": False, "decoder_group_voxels": 1},
        "ours-pageable": {"pinned_copies": False},
        "ours-upnorm": {"row_group_norms": False},
        "ours-loop": {"gathered_broadcasts": False},
        "ours-dupe": {"shared_image_rows": False},
    }
    # The attention adapter's constants (process-wide, bound at setup): (module, name, value).
    constants = {
        "ours-varlen": [(attention, "PER_SEQUENCE_MIN_LEN", 0)],
        "ours-sdpa5k": [(attention, "PER_SEQUENCE_MIN_LEN", 5000)],
        "ours-sdpa": [(attention, "PER_SEQUENCE_MIN_STEPS", 0)],
    }
    # e.g. ours-parts+ours-0.5ms: both changes at once; upstream+ours-sdpa: upstream's loop
    # with that change (the attention adapter's settings apply to both ways)
    parts = way.split("+")
    patches = [patch for part in parts for patch in constants.get(part, [])]
    if compiles(way, backend) and not backend.settings.compile_flow:
        patches += flow_compile.flow_patches(backend.pipeline)
    elif backend.settings.compile_flow and not compiles(way, backend):
        patches += flow_compile.eager_patches(backend.pipeline)
    merged = {k: v for part in parts for k, v in changes.get(part, {}).items()}
    tuning = dataclasses.replace(backend.tuning, **merged)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(backend, "tuning", tuning))
        for patch in patches:
            stack.enter_context(mock.patch.object(*patch))
        if "ours-reuse" in parts:  # the experiment, patched in for the whole job
            from bench.reused_structure import reused_structure

            stack.enter_context(reused_structure(backend.pipeline))
        if parts[0] == "upstream":
            for mask in masks:
                convert_output(backend._run(image, mask, options), image.shape[:2])
            return
        seeds = [int(options.get("seed", 0))] * len(masks)
        list(backend.generate_many(image, masks, camera=None, seeds=seeds, options=options))
    if compiles(way, backend):  # what dynamo made of it (errors fall back to eager silently)
        from torch._dynamo.utils import counters

        breaks = sum(counters["graph_break"].values())
        print(f"compile: {dict(counters['stats'])}, graph breaks {breaks}", flush=True)


def compiles(way: str, backend) -> bool:
    """Whether a way runs stage 1's blocks compiled: ours as the worker runs it
    (``SAM3D_COMPILE_FLOW``, on by default) unless ``ours-eager``; upstream's loop (as the
    seed's integration runs it: eager) only with ``+ours-compile``. The bench's backend is set
    up as the worker's (``Sam3dBackend.setup``: compiled and warmed up by default); a way
    that differs from it patches the blocks for its jobs."""
    parts = way.split("+")
    if "ours-compile" in parts:
        return True
    return parts[0] != "upstream" and "ours-eager" not in parts and backend.settings.compile_flow


def compile_warm_up(backend, image, mask) -> float:
    """The worker's compile warm-up (``SAM3D_COMPILE_FLOW``), timed: the way ``ours-compile``'s
    first job then shows whether it covered a real job's shapes."""
    from unittest import mock

    from worker.backends.sam3d import (
        WARM_UP_OPTIONS,
        flow_compile,
        run_kwargs,
    )

    with contextlib.ExitStack() as stack:
        for patch in flow_compile.flow_patches(backend.pipeline):
            stack.enter_context(mock.patch.object(*patch))
        kwargs = run_kwargs(WARM_UP_OPTIONS)
        seconds = flow_compile.warm_up(backend.pipeline, image, mask, kwargs)
    print(f"compile warm-up (batches of 1 and 2): {seconds:.1f} s", flush=True)
    return seconds


def attention_bench(lengths=(2500, 3500, 5000, 20000), counts=(1, 2, 8, 16), heads=16, dim=64):
    """The sparse attention's kernels on packed sequences, milliseconds per call, fp16:
    PyTorch's varlen (FA2) and one SDPA call per sequence (cuDNN on Hopper), each one's first
    call (for SDPA: cuDNN's plan built for the shape) apart."""
    import torch

    from worker.backends.sam3d import attention as attn

    ways = {"varlen": 0, "sdpa": 1}  # PER_SEQUENCE_MIN_LEN
    saved = attn.PER_SEQUENCE_MIN_LEN
    print(
        "\n| tokens per sequence | sequences | varlen ms | its first call ms "
        "| SDPA per sequence ms | its first call ms | varlen / SDPA |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for length in lengths:
        for count in counts:
            total = length * count
            q, k, v = (
                torch.randn(total, heads, dim, device="cuda", dtype=torch.float16) for _ in range(3)
            )
            cu = torch.arange(0, total + 1, length, device="cuda", dtype=torch.int32)
            times = {}
            for name, min_len in ways.items():
                attn.PER_SEQUENCE_MIN_LEN = min_len
                try:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    attn.flash_attn_varlen_func(q, k, v, cu, cu, length, length)
                    torch.cuda.synchronize()
                    times[f"{name}_first"] = (time.perf_counter() - t0) * 1e3
                    for _ in range(2):
                        attn.flash_attn_varlen_func(q, k, v, cu, cu, length, length)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        attn.flash_attn_varlen_func(q, k, v, cu, cu, length, length)
                    torch.cuda.synchronize()
                    times[name] = (time.perf_counter() - t0) / 10 * 1e3
                except RuntimeError as exc:  # a kernel this torch or GPU lacks
                    print(f"{name} at {count} x {length}: {type(exc).__name__}: {exc}")
                    times[name] = times[f"{name}_first"] = float("nan")
                finally:
                    attn.PER_SEQUENCE_MIN_LEN = saved
            cells = [
                length,
                count,
                f"{times['varlen']:.2f}",
                f"{times['varlen_first']:.1f}",
                f"{times['sdpa']:.2f}",
                f"{times['sdpa_first']:.1f}",
                f"{times['varlen'] / times['sdpa']:.2f}x",
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
            rows.append({"tokens": length, "sequences": count, **times})
    return rows


def compare(
    backend, image, base_masks, plan, ways: list[str], clock: StageClock, variant_rows=None, reps=1
) -> list[dict]:
    """Upstream's per-mask loop against ours for jobs of each size, same GPU and weights.

    Each way first runs the job with seed 0 (``cold``: the first job of that shape on this
    worker, kernel selection and allocator growth included). Then ``reps`` rounds (an int, or
    a mode's count from a dict) run every way once each, in turn, with seeds 1, 2, ...: new
    jobs on a warm worker (other voxel counts, so nothing is replayed), the ways interleaved so
    that a slow spell of a shared machine falls on all of them. The median of a way's rounds is
    compared; every round's seconds are in the row."""
    import statistics

    import torch

    def timed(way, masks, options) -> tuple[float, dict, float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        clock.seconds = {}
        t0 = time.perf_counter()
        run_way(backend, way, image, masks, options)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        stages = {k: round(v, 3) for k, v in clock.seconds.items()}
        # each run as it ends, so a run cut short by a time limit still leaves its rounds
        print(f"run {way} {len(masks)} seed {options['seed']}: {seconds:.3f} s", flush=True)
        return seconds, stages, torch.cuda.max_memory_allocated() / 2**30

    rows = []
    for mode, count in plan:
        masks = job_masks(image, base_masks, count)
        row = {"mode": mode, "objects": count, "chunk": backend.chunk_size(count)}
        row_ways = ways if variant_rows is None or (mode, count) in variant_rows else ways[:2]
        rounds = reps.get(mode, 1) if isinstance(reps, dict) else reps
        runs: dict[str, list] = {way: [] for way in row_ways}
        for seed in range(0, rounds + 1):
            for way in [w for w in row_ways if f"{w}_error" not in row]:
                try:
                    result = timed(way, masks, {"seed": seed, **MODES[mode]})
                except Exception as exc:  # e.g. a compile: the other ways' rows still come
                    if way == row_ways[0]:
                        raise
                    row[f"{way}_error"] = f"{type(exc).__name__}: {exc}"
                    print(f"way {way} failed: {row[f'{way}_error']}", flush=True)
                    continue
                if seed == 0:
                    row[f"{way}_cold_s"] = result[0]
                else:
                    runs[way].append(result)
        row["ways"] = row_ways = [w for w in row_ways if f"{w}_error" not in row]
        for way in row_ways:
            seconds = [r[0] for r in runs[way]]
            median = statistics.median(seconds)
            nearest = min(runs[way], key=lambda r: abs(r[0] - median))
            row[f"{way}_s"] = median
            row[f"{way}_runs_s"] = [round(x, 3) for x in seconds]
            row[f"{way}_obj_per_s"] = count / median
            row[f"{way}_peak_gb"] = max(r[2] for r in runs[way])
            row[f"{way}_stages"] = nearest[1]
        for way in row_ways[1:]:
            row[f"{way}_speedup"] = row[f"{way}_obj_per_s"] / row[f"{ways[0]}_obj_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def label_parts(pipeline) -> None:
    """``record_function`` labels on the models and upstream's per-object helpers, so a trace
    (bench/trace.py) says which of them the GPU ran, and which of them it waited for."""
    import torch

    def labelled(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)

        return wrapper

    targets = [(f"model:{name}", model) for name, model in dict(pipeline.models).items()]
    embedders = getattr(pipeline, "condition_embedders", None) or {}
    targets += [(f"model:{name}", m) for name, m in embedders.items() if m is not None]
    targets += [(f"{n}.out_layer", m.out_layer) for n, m in targets if hasattr(m, "out_layer")]
    targets += flow_parts(pipeline)
    for name, obj in targets:
        if hasattr(obj, "forward"):
            obj.forward = labelled(name, obj.forward)
        if hasattr(obj, "to_representation"):
            obj.to_representation = labelled(f"{name}.to_representation", obj.to_representation)
    for name in ("ss_preprocessor", "slat_preprocessor"):
        pre = getattr(pipeline, name, None)
        method = "_process_image_mask_pointmap_mess"
        if pre is not None and hasattr(pre, method):
            setattr(pre, method, labelled(f"pre:{name}", getattr(pre, method)))
    if hasattr(pipeline, "pose_decoder"):
        pipeline.pose_decoder = labelled("pose_decoder", pipeline.pose_decoder)


def flow_parts(pipeline) -> list[tuple[str, Any]]:
    """Labels inside stage 2 and the mesh decoder's tail, for where their time goes: the SLAT
    flow's sparse-convolution blocks at full resolution (in and out), its transformer blocks
    and their attention and MLP parts; the mesh decoder's two upsampling blocks. Stage 1's
    blocks are left alone (compiled: a wrapper would sit outside the graph anyway)."""
    models = dict(getattr(pipeline, "models", {}))
    parts: list[tuple[str, Any]] = []
    backbone = getattr(getattr(models.get("slat_generator"), "reverse_fn", None), "backbone", None)
    for name in ("input_blocks", "out_blocks"):
        parts += [(f"slat:{name}", m) for m in getattr(backbone, name, None) or []]
    for block in getattr(backbone, "blocks", None) or []:
        parts.append(("slat:block", block))
        subs = ("self_attn", "cross_attn", "mlp")
        parts += [(f"slat:{p}", getattr(block, p)) for p in subs if hasattr(block, p)]
    mesh = models.get("slat_decoder_mesh")
    parts += [("mesh:upsample", m) for m in getattr(mesh, "upsample", None) or []]
    return parts


def profile(
    backend, image, base_masks, counts: list[int], mode: str, top: int = 30, trace=None
) -> dict:
    """torch.profiler over one job per count: the GPU's busy share of the wall time, and the
    kernels and CPU ops that take it. ``trace``: a path; each count's Chrome trace is written
    beside it (gzipped) and read back as a timeline (bench/trace.py)."""
    import gzip

    import torch
    from torch.profiler import ProfilerActivity

    from bench import trace as timeline

    if trace is not None:
        label_parts(backend.pipeline)
    report = {}
    for count in counts:
        masks = job_masks(image, base_masks, count)
        run_way(backend, "ours", image, masks, {"seed": 0, **MODES[mode]})  # warm for this shape
        torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof, post_times() as post:
            t0 = time.perf_counter()
            run_way(backend, "ours", image, masks, {"seed": 1, **MODES[mode]})  # a new job
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        print(f"\nProfile, {mode}, {count} objects: wall {wall:.2f} s (profiled), GPU kernels "
              f"{busy:.2f} s = {100 * busy / wall:.0f} % busy\n")  # fmt: skip
        print(
            events.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60)
        )
        print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60))
        report[str(count)] = {"wall_s": wall, "gpu_busy_s": busy, "post": post}
        print("\nEach object's host-side finish (post threads; seconds since the job began):\n")
        print("| thread | start | upstream's GLB | ours | end |\n|---|---|---|---|---|")
        for row in sorted(post, key=lambda r: r["start"]):
            print(f"| {row['thread']} | {row['start']:.3f} | {row['glb_s']:.3f} | "
                  f"{row['ours_s']:.3f} | {row['end']:.3f} |")  # fmt: skip
        if trace is not None:
            path = Path(trace).with_name(f"{Path(trace).name}.{mode}-{count}.json.gz")
            with tempfile.TemporaryDirectory() as folder:
                raw = Path(folder) / "trace.json"
                prof.export_chrome_trace(str(raw))
                with open(raw, "rb") as f, gzip.open(path, "wb", compresslevel=6) as out:
                    shutil.copyfileobj(f, out)
                result = timeline.analyse(timeline.load(raw), bin_ms=100.0)
            print(f"\nTimeline, {mode}, {count} objects (trace: {path}):\n")
            print(timeline.report(result))
            report[str(count)]["timeline"] = {k: v for k, v in result.items() if k != "bins"}
    return report


@contextlib.contextmanager
def post_times():
    """Within: each object's host-side finish on the post threads (upstream's GLB
    conversion, then ours), timed from entry: a list of dicts, filled as they finish."""
    from unittest import mock

    from worker.backends.sam3d import decoders

    rows: list[dict] = []
    t0 = time.perf_counter()
    own = decoders._finish

    def timed(pipeline, kwargs, output, finish, pinned=True):
        start = time.perf_counter()
        output = own(pipeline, kwargs, output, None, pinned)
        middle = time.perf_counter()
        result = finish(output) if finish is not None else output
        end = time.perf_counter()
        rows.append(
            {
                "thread": threading.current_thread().name,
                "start": start - t0,
                "glb_s": middle - start,
                "ours_s": end - middle,
                "end": end - t0,
            }
        )
        return result

    with mock.patch.object(decoders, "_finish", timed):
        yield rows


def count_flops(backend, image, mask, options) -> dict[str, float]:
    """FLOPs per stage for one object (torch's FlopCounterMode; not timed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from worker.backends.sam3d import attention

    counter = FlopCounterMode(display=False)
    flops: dict[str, float] = {}
    tally = [0.0]
    originals = {}
    for stage, method in STAGES.items():
        fn = getattr(backend.pipeline, method)
        originals[method] = fn

        def counted(*a, _fn=fn, _stage=stage, **k):
            before = counter.get_total_flops() + tally[0]
            try:
                return _fn(*a, **k)
            finally:
                after = counter.get_total_flops() + tally[0]
                flops[_stage] = flops.get(_stage, 0) + after - before

        setattr(backend.pipeline, method, counted)
    attention.flop_tally = tally
    try:
        with counter:
            backend._run(image, mask, options)
    finally:
        attention.flop_tally = None
        for method, fn in originals.items():
            setattr(backend.pipeline, method, fn)
    flops["varlen_attention_all_stages"] = tally[0]
    return flops


def print_table(rows: dict[str, dict]) -> None:
    cols = [
        *STAGES,
        "convert",
        "export",
        "upload",
        "run_total",
        "peak_gb",
        "voxels",
        "splats",
        "faces",
        "mb",
    ]
    print("| mode | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, row in rows.items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)))
        print(f"| {mode} | " + " | ".join(cells) + " |")


def print_compare(rows: list[dict], ways: list[str]) -> None:
    print("\nJobs of N objects, each way on the same GPU and weights:")
    for way in ways:
        print(f"  {way}: " + "; ".join(WAYS[part] for part in way.split("+")))
    print("\n| mode | objects | way | s/job | obj/s | vs " + ways[0] + " | first job s | peak GB "
          "| stage 1 s | stage 2 s | decoders s | batch | rounds s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for way in r.get("ways", ways):
            st = r[f"{way}_stages"]
            speed = r.get(f"{way}_speedup", 1.0)
            print(
                f"| {r['mode']} | {r['objects']} | {way} | {r[f'{way}_s']:.2f} | "
                f"{r[f'{way}_obj_per_s']:.3f} | {speed:.2f}x | {r[f'{way}_cold_s']:.2f} | "
                f"{r[f'{way}_peak_gb']:.1f} | "
                f"{st.get('stage1', 0):.2f} | {st.get('stage2', 0):.2f} | "
                f"{st.get('decoders', 0):.2f} | {r['chunk']} | "
                + ", ".join(f"{x:.2f}" for x in r.get(f"{way}_runs_s", []))
                + " |"
            )


def segmenter_prompts(size: tuple[int, int], count: int, kind: str) -> list[dict]:
    """``count`` prompts of ``kind`` on a grid over the image (boxes a cell each)."""
    height, width = size
    side = int(np.ceil(np.sqrt(count)))
    prompts = []
    for i in range(count):
        row, col = divmod(i, side)
        x0, y0 = col * width / side, row * height / side
        x1, y1 = x0 + width / side, y0 + height / side
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        box = [x0 + 2, y0 + 2, x1 - 2, y1 - 2]
        points = [[cx, cy, 1], [x0 + 3, y0 + 3, 0]]
        prompts.append(
            {"box": box} if kind == "boxes"
            else {"points": points} if kind == "clicks"
            else {"box": box, "points": points[:1]}
        )  # fmt: skip
    return prompts


def bench_segmenter(image: np.ndarray, counts: list[int], repeat: int) -> dict:
    """sam3's seconds per image and peak GPU memory, resident beside whatever is loaded."""
    import torch

    from worker.segmenters.sam3 import Sam3Segmenter

    settings = Settings.from_env(segmenter="sam3", sam3_device="cuda")
    if not settings.sam3_checkpoint:
        settings = Settings.from_env(segmenter="sam3", sam3_device="cuda", sam3_random_weights=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    segmenter = Sam3Segmenter(settings)
    segmenter.setup()
    torch.cuda.synchronize()
    report = {
        "version": segmenter.version,
        "setup_s": time.perf_counter() - t0,
        "resident_before_gb": before / 2**30,
        "sam3_weights_gb": (torch.cuda.memory_allocated() - before) / 2**30,
        "rows": [],
    }

    def timed(prompts: list[dict]) -> tuple[float, float, int]:
        torch.cuda.reset_peak_memory_stats()
        best, found = float("inf"), 0
        for _ in range(repeat + 1):  # the first is a warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            found = len(segmenter.segment(image, prompts))
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0) if _ else best
        return best, torch.cuda.max_memory_allocated() / 2**30, found

    for kind in ("boxes", "clicks", "boxes + clicks"):
        for count in counts:
            seconds, peak, found = timed(segmenter_prompts(image.shape[:2], count, kind))
            report["rows"].append(
                {"prompts": f"{count} {kind}", "s": seconds, "peak_gb": peak, "masks": found}
            )
    seconds, peak, found = timed([{"text": "object", "max_objects": 64, "min_score": 0.0}])
    report["rows"].append({"prompts": "1 text", "s": seconds, "peak_gb": peak, "masks": found})
    return report


def print_segmenter(report: dict, image: np.ndarray) -> None:
    print(
        f"\nsam3 segmenter ({report['version']}), image {image.shape[1]}x{image.shape[0]}, "
        f"setup {report['setup_s']:.1f} s, weights {report['sam3_weights_gb']:.2f} GB on top of "
        f"{report['resident_before_gb']:.2f} GB already resident (SAM 3D)\n"
    )
    print("| prompts (one image) | s per image | peak GPU GB (all resident) | masks |")
    print("|---|---|---|---|")
    for row in report["rows"]:
        print(f"| {row['prompts']} | {row['s']:.3f} | {row['peak_gb']:.2f} | {row['masks']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="SAM 3D's folder (kept resident beside sam3)")
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "shapes.jpg")
    parser.add_argument("--masks", type=Path, default=ROOT / "samples" / "shapes.coco.json")
    parser.add_argument("--repeat", type=int, default=2, help="runs per mode (best is shown)")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--compare", default="", help="object counts, e.g. 1,4,8 or fast:1,4,8;default:1,4"
    )
    parser.add_argument("--modes", default="default,fast")
    parser.add_argument(
        "--reps", default="1", help="--compare rounds per row: 3, or per mode: fast=3,default=1"
    )
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--flops", action="store_true")
    parser.add_argument("--ways", default="upstream,ours", help=",".join(WAYS))
    parser.add_argument(
        "--variant-rows",
        default="",
        help="rows that run every --ways, e.g. fast:8 (the others: the first two ways only)",
    )
    parser.add_argument("--profile", default="", help="object counts to profile, e.g. 1,4")
    parser.add_argument("--profile-mode", default="default", choices=list(MODES))
    parser.add_argument("--trace", type=Path, help="with --profile: Chrome traces, and timelines")
    parser.add_argument(
        "--shell-voxels",
        action="store_true",
        help="realistic geometry after stage 1 (see use_shell_voxels)",
    )
    parser.add_argument(
        "--shell-surface",
        action="store_true",
        help="with --shell-voxels: meshes of a real object's size (see use_shell_surfaces)",
    )
    parser.add_argument("--attention", action="store_true", help="the attention kernels alone")
    parser.add_argument("--segmenter", choices=["sam3"], help="also bench this segmenter")
    parser.add_argument(
        "--segmenter-only", action="store_true", help="SAM 3D resident but not benched"
    )
    parser.add_argument("--prompts", default="1,8,64", help="prompt counts for --segmenter")
    args = parser.parse_args()
    ways = [w for w in args.ways.split(",") if w]
    if unknown := {part for way in ways for part in way.split("+")} - set(WAYS):
        parser.error(f"unknown --ways {sorted(unknown)}; choose from {sorted(WAYS)}")
    if args.shell_surface and not args.shell_voxels:
        parser.error("--shell-surface needs --shell-voxels (the sphere is the shell's)")
    if args.segmenter_only and not args.segmenter:
        args.segmenter = "sam3"
    if not args.checkpoint and not args.segmenter_only:
        parser.error("--checkpoint is needed (or --segmenter-only: sam3 alone)")

    import torch

    from worker.backends.sam3d import Sam3dBackend

    settings = Settings.from_env(checkpoint_dir=args.checkpoint or "")
    image = decode_image(args.image.read_bytes())
    base_masks = decode_masks(json.loads(args.masks.read_text()), image.shape[:2])
    mask = base_masks[0]
    report: dict = {}
    if args.segmenter_only and not args.checkpoint:  # sam3 alone, nothing else resident
        counts = [int(c) for c in args.prompts.split(",") if c]
        report["segmenter"] = bench_segmenter(image, counts, args.repeat)
        print_segmenter(report["segmenter"], image)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    t0 = time.perf_counter()
    backend = Sam3dBackend(settings)
    backend.setup()
    setup_s = time.perf_counter() - t0
    modes = [m for m in args.modes.split(",") if m]
    report["setup_s"] = setup_s
    print(
        f"\nSAM 3D on {torch.cuda.get_device_name(0)}, torch {torch.__version__}, attention "
        f"{backend.attention}, setup (load + warm-up) {setup_s:.1f} s, image "
        f"{image.shape[1]}x{image.shape[0]}\n"
    )
    if args.segmenter:
        counts = [int(c) for c in args.prompts.split(",") if c]
        report["segmenter"] = bench_segmenter(image, counts, args.repeat)
        print_segmenter(report["segmenter"], image)
        if args.segmenter_only:
            args.compare, args.stages = "", False
    if args.attention:
        report["attention"] = attention_bench()
    if args.shell_voxels:
        use_shell_voxels(backend.pipeline)
        print("Stage 1's voxels replaced by shells of the same count (--shell-voxels)\n")
    report["shell_voxels"] = args.shell_voxels
    if args.shell_surface:
        use_shell_surfaces(backend.pipeline)
        print("The mesh decoder's SDF replaced by the shell's sphere (--shell-surface)\n")
    report["shell_surface"] = args.shell_surface
    clock = StageClock(backend.pipeline)
    if args.profile:
        counts = [int(c) for c in args.profile.split(",")]
        report["profile"] = profile(
            backend, image, base_masks, counts, args.profile_mode, trace=args.trace
        )
    if args.compare:
        plan = compare_plan(args.compare, modes)
        variants = compare_plan(args.variant_rows, modes) if args.variant_rows else None
        reps = (
            {m: int(n) for m, n in (p.split("=") for p in args.reps.split(","))}
            if "=" in args.reps
            else int(args.reps)
        )
        if not backend.settings.compile_flow and any(compiles(way, backend) for way in ways):
            report["compile_warm_up_s"] = compile_warm_up(backend, image, base_masks[0])
        report["compare"] = compare(
            backend, image, base_masks, plan, ways, clock, variants, reps=reps
        )
        print_compare(report["compare"], ways)
    if args.stages:
        flops = None
        if args.flops:
            flops = count_flops(backend, image, mask, {"seed": 0})
        storage = FileStorage(tempfile.mkdtemp(prefix="bench-gpu-"), signing_secret="bench")
        rows: dict[str, dict] = {}
        for mode in modes:
            runs = [
                one_object(backend, clock, image, mask, {"seed": 0, **MODES[mode]}, storage)
                for _ in range(args.repeat)
            ]
            rows[mode] = min(runs, key=lambda r: r["run_total"])
        if flops:
            rows["TFLOP/s (default)"] = {
                stage: flops[stage] / rows["default"][stage] / 1e12
                for stage in STAGES
                if stage in flops and "default" in rows
            }
            report["flops"] = flops
        print(f"\nOne object, best of {args.repeat}; seconds unless named:\n")
        print_table(rows)
        report["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
