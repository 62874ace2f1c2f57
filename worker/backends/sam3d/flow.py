"""Every object of one image through SAM 3D together, in batches that fit the free GPU memory.

Upstream's ``run()`` takes one mask: the depth model, the image conversion and both flows run
again for every object, each flow step at batch 1. Here, per image, once: the RGB image as
floats and the pointmap (MoGe, or the caller's); per object: upstream's own preprocessors on
that image and the object's mask (its crop at the model's 518 px, the full view, pointmap
normalisation). Then, per part (a chunk of what the free memory holds; ``parts``):

- stage 1 (sparse structure) for the whole part in one batch through upstream's
  ``sample_sparse_structure``, with its voxel pruning and downsampling applied per object (run
  on the whole batch they would mix objects: both look at an occupancy grid that ignores the
  batch index);
- stage 2 (the SLAT flow) with all the part's voxels in one sparse tensor (batch indices; the
  sparse attention is variable-length, so objects never attend to each other);
- the decoders: the Gaussian decoder and the mesh decoder's transformer trunk over the whole
  part, one call each; the mesh decoder's upsampling and FlexiCubes (what its 42,000-voxel
  limit is for) one object per call, ``streams`` calls side by side on their own threads and
  CUDA streams, beside the next part's flows (``Decoder``, ``generate_outputs``).

**CFG pairs in one call.** Upstream's classifier-free guidance calls the flow backbone twice per
guided step: once with the condition, once with it zeroed (``add_flag`` with
``force_zeros_cond``). Here both halves go through one backbone call: the latents twice along
the batch (stage 2: the packed voxels twice, the copy's batch indices shifted by the object
count) and the condition next to zeros. Same arithmetic, half the calls; a backbone call of a
few objects costs about what one costs (stage 1 on the H200: 100 ms at batch 1, 101 at 2).

**Seeds.** Object ``i`` draws its noise exactly as ``run(seed=seeds[i])`` would alone: its stage-1
noise right after ``torch.cuda.manual_seed(seed)``, its stage-2 noise from the generator state
that followed. An object's batched output equals its own ``run()`` up to fp16 arithmetic
(tests/test_sam3d_gpu.py checks it on the GPU).

This module is the flow; the decoders are ``decoders``, the paired guidance ``guidance``, the
shared image rows ``image_rows``, the sparse-op patches ``sparse``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from worker.backends.sam3d import patching
from worker.backends.sam3d.decoders import Decoder, on_thread
from worker.backends.sam3d.exits import Leave, step_exits
from worker.backends.sam3d.guidance import cfg_pairs
from worker.backends.sam3d.image_rows import shared_image_rows
from worker.backends.sam3d.patching import Patch
from worker.backends.sam3d.tuning import Tuning

_PIPELINE_MODULE = "sam3d_objects.pipeline.inference_pipeline"
DEFAULT_TUNING = Tuning()


def chunks(count: int, size: int) -> list[range]:
    """Object indices ``0..count-1`` in consecutive runs of at most ``size``."""
    size = max(1, size)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _per_object(fn):
    """Upstream's prune/downsample, applied to each object's (batch-indexed) voxels alone."""
    import torch

    def apply(coords, *args, **kwargs):
        parts, factors = [], []
        for b in torch.unique(coords[:, 0]).tolist():
            out = fn(coords[coords[:, 0] == b], *args, **kwargs)
            if isinstance(out, tuple):  # downsample: (coords, factor)
                out, factor = out
                factors.append(float(factor))
            parts.append(out)
        merged = torch.cat(parts)
        if not factors:
            return merged
        return merged, torch.tensor(factors, device=coords.device)[:, None]

    return apply


@contextlib.contextmanager
def _batch_aware(pipeline, seeds: Sequence[int], voxel_counts: list[int]):
    """Per-object noise and voxel post-processing for the duration of one chunk."""
    import torch

    module = importlib.import_module(_PIPELINE_MODULE)
    ss_gen = pipeline.models["ss_generator"]
    slat_gen = pipeline.models["slat_generator"]
    ss_noise, slat_noise = ss_gen._generate_noise, slat_gen._generate_noise
    prune, downsample = module.prune_sparse_structure, module.downsample_sparse_structure
    states: list[torch.Tensor] = []

    def stage1_noise(x_shape, x_device):
        one = (
            {k: (1, *v[1:]) for k, v in x_shape.items()}
            if isinstance(x_shape, dict)
            else (1, *x_shape[1:])
        )
        draws = []
        for seed in seeds:
            torch.cuda.manual_seed(seed)
            draws.append(ss_noise(one, x_device))
            states.append(torch.cuda.get_rng_state())
        if isinstance(one, dict):
            return {k: torch.cat([d[k] for d in draws]) for k in one}
        return torch.cat(draws)

    def stage2_noise(x_shape, x_device):
        draws = []
        for state, count in zip(states, voxel_counts, strict=True):
            torch.cuda.set_rng_state(state)
            draws.append(slat_noise((1, count, x_shape[-1]), x_device))
        return torch.cat(draws, dim=1)  # one packed sequence: the wrapper reads x[0]

    with patching.scoped(
        [
            Patch(ss_gen, "_generate_noise", stage1_noise, "batched_flow"),
            Patch(slat_gen, "_generate_noise", stage2_noise, "batched_flow"),
            Patch(module, "prune_sparse_structure", _per_object(prune), "batched_flow"),
            Patch(module, "downsample_sparse_structure", _per_object(downsample), "batched_flow"),
        ]
    ):
        yield


def _object_input(pipeline, preprocessor, rgb, mask, pointmap) -> dict:
    """Upstream's preprocessing of one object (as its ``preprocess_image``), on a shared image."""
    out = preprocessor._process_image_mask_pointmap_mess(rgb, mask, pointmap)
    keys = ["mask", "image", "rgb_image", "rgb_image_mask"]
    if pointmap is not None and preprocessor.pointmap_transform != (None,):
        keys += ["pointmap", "rgb_pointmap", "pointmap_scale", "pointmap_shift"]
        keys += ["rgb_pointmap_scale", "rgb_pointmap_shift"]
    return {k: out[k][None].to(pipeline.device) for k in keys}


def _decode_poses(pipeline, ss: dict, ss_input: dict, count: int) -> dict:
    """Upstream's pose decoder, one object at a time (it squeezes a batch of one)."""
    import torch

    def one(value, b):
        batched = torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == count
        return value[b : b + 1] if batched else value

    poses = []
    for b in range(count):
        view = {k: one(v, b) for k, v in ss.items() if k not in ("coords", "coords_original")}
        scale, shift = ss_input.get("pointmap_scale"), ss_input.get("pointmap_shift")
        poses.append(
            pipeline.pose_decoder(view, scene_scale=one(scale, b), scene_shift=one(shift, b))
        )
    return {k: torch.cat([p[k].reshape(1, -1) for p in poses]) for k in poses[0]}


def _stack(items: list[dict]) -> dict:
    import torch

    return {k: torch.cat([item[k] for item in items]) for k in items[0]}


def parts(count: int, chunk_size: int, min_part: int | None = None) -> list[range]:
    """Object indices in the parts they go through SAM 3D in: chunks of at most ``chunk_size``
    (what the free memory holds); with ``min_part`` (``Tuning.pipeline_min_part``), halved
    from twice that on, so that one part's flows run while the part before it decodes."""
    size = max(1, min(chunk_size, count))
    if min_part is not None and size >= 2 * min_part:
        size = max(min_part, -(-size // 2))
    return chunks(count, size)


@dataclasses.dataclass(frozen=True)
class Row:
    """One object of a batch: its image (an index into ``generate_rows``' images), its mask
    (``masks[pos]``, decoded when it is needed), its seed."""

    image: int
    masks: Sequence[np.ndarray]
    pos: int
    seed: int

    def mask(self) -> np.ndarray:
        return self.masks[self.pos]


def generate_outputs(
    pipeline,
    image: np.ndarray,
    masks: np.ndarray,
    seeds: Sequence[int],
    kwargs: Mapping[str, Any],
    *,
    chunk_size: int,
    pointmap=None,
    finish: Callable[[dict], Any] | None = None,
    tuning: Tuning = DEFAULT_TUNING,
    disabled: Collection[str] = (),
) -> Iterator[Any]:
    """One upstream-shaped output dict per mask (or ``finish`` of it), in order, part by part.
    ``tuning``: the knobs (threads, streams, parts, the fast paths' switches); ``disabled``:
    fast paths the worker found off at setup (``surface``), by name.

    ``kwargs`` are upstream ``run()`` keyword arguments (``run_kwargs``); ``pointmap`` an
    optional H x W x 3 tensor in PyTorch3D's camera frame (else MoGe estimates it, once).

    Four kinds of work overlap, each where it leaves the others room:

    - this thread runs each part's flows (stage 1 and stage 2: large kernels, little host
      work) on the default CUDA stream, then goes on to the next part (``parts``: by default
      the next memory chunk) while this part decodes;
    - this thread also runs the part's decoder trunks (``Decoder``), then
      ``tuning.decoder_streams`` threads run the mesh decoder's tails, one object each, each
      thread on its own CUDA stream. The tails synchronise with the host hundreds of times
      per object (sparse convolution's index building, FlexiCubes), so alone they leave the
      GPU idle; beside
      each other (and the next part's flows) they fill its gaps. 0 streams: decoded on this
      thread, in turn;
    - ``tuning.prep_threads`` threads run the objects' preprocessing side by side, and the poses
      while stage 2 runs;
    - ``tuning.postprocess_threads`` threads run the host-side part after the decoders
      (upstream's GLB conversion, then ``finish``), one object each.

    Memory: a part's flows and the part before it's decoders are on the GPU together, which is
    why, with ``tuning.pipeline_min_part`` set, a chunk that fits the free memory is halved into
    parts. Whole chunks of a job larger than one chunk share the GPU the same way; the
    reserve (``SAM3D_GPU_RESERVE_GB``) holds the decoders' working memory (measured on the
    H200 for 8 objects with the trunks: about 7 GB with one object per tail on 2 streams, the
    default; 12.3 GB with two per tail on 3 streams).
    """
    rows = [Row(0, masks, i, int(seeds[i])) for i in range(len(masks))]
    for _, output in generate_rows(
        pipeline, [(image, pointmap, finish)], rows, kwargs, chunk_size=chunk_size,
        tuning=tuning, disabled=disabled,
    ):  # fmt: skip
        yield output


def generate_rows(
    pipeline,
    images: Sequence[tuple[np.ndarray, Any, Callable[[dict], Any] | None]],
    rows: Sequence[Row],
    kwargs: Mapping[str, Any],
    *,
    chunk_size: int,
    tuning: Tuning = DEFAULT_TUNING,
    disabled: Collection[str] = (),
    leaving: Callable[[], Collection[int]] | None = None,
) -> Iterator[tuple[int, Any]]:
    """``(row index, output)`` for every row, in row order, part by part: the objects of
    several images (``images``: each its pixels, its optional pointmap, its ``finish``) in
    shared passes, each row conditioned on its own image (``generate_outputs`` is the one-image
    case). ``leaving()`` names images whose rows must leave: checked at every flow step
    (``step_exits``), the part in progress then starts again without them (each row's noise
    comes from its own seed, so the others' outputs do not change), and before each part's
    decoders; no output of a row that left is yielded after it left."""
    from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp

    from worker.backends.sam3d import sparse

    t = tuning
    if "mesh_trunks" in disabled:
        t = dataclasses.replace(t, batched_trunks=False)  # whole upstream decode_slat calls

    def on(path: str) -> bool:
        return bool(getattr(t, path)) and path not in disabled

    def gone() -> set[int]:
        return set(leaving()) if leaving is not None else set()

    with contextlib.ExitStack() as stack:
        post = ThreadPoolExecutor(max(1, t.postprocess_threads), thread_name_prefix="sam3d-post")
        stack.callback(post.shutdown, wait=True, cancel_futures=True)
        decoders = None
        if t.decoder_streams > 0:
            decoders = ThreadPoolExecutor(t.decoder_streams, thread_name_prefix="sam3d-decode")
            stack.callback(decoders.shutdown, wait=True, cancel_futures=True)
        # Host work off the flows' thread: each object's preprocessing, the poses.
        prep = ThreadPoolExecutor(t.prep_threads, thread_name_prefix="sam3d-prep")
        stack.callback(prep.shutdown, wait=True, cancel_futures=True)
        stack.enter_context(pipeline.device)
        stack.enter_context(cfg_pairs(pipeline, on("cfg_pairs")))
        stack.enter_context(sparse.gathered_broadcasts(on("gathered_broadcasts")))
        stack.enter_context(sparse.row_group_norms(on("row_group_norms")))
        stack.enter_context(shared_image_rows(pipeline, on("shared_image_rows")))
        if t.switch_interval_s is not None:
            stack.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(t.switch_interval_s)
        inputs = [image_inputs(pipeline, image, pointmap) for image, pointmap, _ in images]
        finishes = [finish for _, _, finish in images]
        decoder = Decoder(pipeline, sp, kwargs, post, decoders, t)
        queue: deque = deque()  # per decoder call, in order: its objects' finished futures
        current: list[int] = []  # the rows of the part whose flows run

        def check() -> None:
            if leaving is not None and gone() & {rows[r].image for r in current}:
                raise Leave

        if leaving is not None and on("step_exits"):
            stack.enter_context(step_exits(pipeline, check))
        for part in parts(len(rows), chunk_size, t.pipeline_min_part):
            current[:] = list(part)
            sampled = None
            while sampled is None:
                left = gone()
                current[:] = [r for r in current if rows[r].image not in left]
                if not current:
                    break
                try:
                    sampled = _sample_part(pipeline, inputs, rows, list(current), kwargs, prep)
                except Leave:
                    continue  # again, without the rows that left
            if sampled is None:
                continue
            sampled["finish"] = [finishes[rows[r].image] for r in sampled["part"]]
            queue.extend(decoder.submit(sampled))
            del sampled
            while queue and queue[0].done():
                yield from _results(queue.popleft().result(), rows, gone())
        while queue:
            yield from _results(queue.popleft().result(), rows, gone())


def _results(futures, rows: Sequence[Row], left: set[int]) -> Iterator[tuple[int, Any]]:
    for future in futures:
        row, output = future.result()
        if rows[row].image not in left:
            yield row, output


def image_inputs(pipeline, image: np.ndarray, pointmap=None) -> tuple[Any, Any, dict]:
    """What every object of the image shares, computed once (under the pipeline's device):
    the RGB image as floats, the pointmap (MoGe's unless given), and the downsampled pointmap
    and its colours that each output carries."""
    import torch

    rgba = np.concatenate([image[..., :3], np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
    pointmap_dict = pipeline.compute_pointmap(rgba, pointmap)
    points = pointmap_dict["pointmap"]
    pts = type(pipeline)._down_sample_img(points).cpu().permute(1, 2, 0)
    pts_colors = type(pipeline)._down_sample_img(pointmap_dict["pts_color"]).cpu().permute(1, 2, 0)
    rgb = torch.from_numpy(image[..., :3]).permute(2, 0, 1).float().div_(255.0)
    return rgb, points, {"pointmap": pts, "pointmap_colors": pts_colors}


def stage1_input(pipeline, image: np.ndarray, mask: np.ndarray) -> dict:
    """One object's stage-1 input (MoGe, then upstream's stage-1 preprocessor), batch of one."""
    import torch

    with pipeline.device, torch.no_grad():
        rgb, points, _ = image_inputs(pipeline, image)
        return _object_input(pipeline, pipeline.ss_preprocessor, rgb, _mask_tensor(mask), points)


def sample_stage1(pipeline, ss_input: dict, count: int, kwargs) -> dict:
    """Stage 1 for ``count`` copies of one object's input (``stage1_input``), in one batch
    (the compiled blocks' warm-up: ``flow_compile.warm_up``); upstream's
    ``sample_sparse_structure`` output."""
    import torch

    with pipeline.device:
        batch = {k: torch.cat([v] * count) for k, v in ss_input.items()}
        return pipeline.sample_sparse_structure(
            batch,
            inference_steps=kwargs.get("stage1_inference_steps"),
            use_distillation=kwargs.get("use_stage1_distillation", False),
        )


def _stage_input(pipeline, stage: str, rgb, points, mask: np.ndarray) -> dict:
    """One object's input to ``stage`` ("ss": stage 1, with the pointmap; "slat": stage 2,
    without), through upstream's preprocessor for it."""
    preprocessor = getattr(pipeline, f"{stage}_preprocessor")
    return _object_input(pipeline, preprocessor, rgb, _mask_tensor(mask), points)


def _mask_tensor(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask)).float()[None]


def _sample_part(pipeline, inputs, rows: Sequence[Row], part: list[int], kwargs, prep) -> dict:
    """The part's rows (``part``: indices into ``rows``) through stage 1 and stage 2, all in
    one batch each, each row on its own image's ``inputs`` (``image_inputs``). ``prep``: an
    executor for host work beside them (the objects' preprocessing, side by side: stage 1's
    first, stage 2's while stage 1 runs; the poses, while stage 2 runs: its result is not
    needed before the decoders)."""
    import torch

    from worker.backends.sam3d import attention

    work = functools.partial(on_thread, pipeline, _stage_input, pipeline)

    def stage_input(stage: str, r: int) -> dict:
        rgb, points, _ = inputs[rows[r].image]
        return work(stage, rgb, points if stage == "ss" else None, rows[r].mask())

    ss_input = _stack(list(prep.map(functools.partial(stage_input, "ss"), part)))
    # stage 2's inputs on the prep threads while stage 1 runs (they need no stage-1 result)
    slat_items = [prep.submit(stage_input, "slat", r) for r in part]
    part_seeds = [rows[r].seed for r in part]
    voxel_counts: list[int] = []
    with _batch_aware(pipeline, part_seeds, voxel_counts):
        ss = pipeline.sample_sparse_structure(
            ss_input,
            inference_steps=kwargs.get("stage1_inference_steps"),
            use_distillation=kwargs.get("use_stage1_distillation", False),
        )
        coords = ss["coords"]
        batch = coords[:, 0]
        voxel_counts.extend(torch.bincount(batch.long(), minlength=len(part)).tolist())
        empty = [part[b] for b, n in enumerate(voxel_counts) if n == 0]
        if empty:
            from jobs.errors import ErrorCode, Sam3dError

            raise Sam3dError(
                ErrorCode.BACKEND_FAILED, f"SAM 3D found no voxels for objects {empty}"
            )
        poses = prep.submit(on_thread, pipeline, _decode_poses, pipeline, ss, ss_input, len(part))
        slat_input = _stack([item.result() for item in slat_items])
        del slat_items
        steps = kwargs.get("stage2_inference_steps")
        with attention.for_steps(steps):
            slat = pipeline.sample_slat(
                slat_input,
                coords,
                inference_steps=steps,
                use_distillation=kwargs.get("use_stage2_distillation", False),
            )
        ss.update(poses.result())
        factor = ss["downsample_factor"]
        ss["scale"] = ss["scale"] * (factor if torch.is_tensor(factor) else float(factor))
    return {
        "part": part,
        "shared": [inputs[rows[r].image][2] for r in part],
        "coords": coords,
        "batch": batch,
        "ss": ss,
        "slat": slat,
        "voxel_counts": voxel_counts,
    }
