"""Every object of one image through SAM 3D together, in batches that fit the free GPU memory.

Upstream's ``run()`` takes one mask: the depth model, the image conversion and both flows run
again for every object, each flow step at batch 1. Here, per image, once: the RGB image as
floats and the pointmap (MoGe, or the caller's); per object: upstream's own preprocessors on
that image and the object's mask (its crop at the model's 518 px, the full view, pointmap
normalisation). Then, per chunk of objects:

- stage 1 (sparse structure) for the whole chunk in one batch through upstream's
  ``sample_sparse_structure``, with its voxel pruning and downsampling applied per object (run
  on the whole batch they would mix objects: both look at an occupancy grid that ignores the
  batch index);
- stage 2 (the SLAT flow) with all the chunk's voxels in one sparse tensor (batch indices; the
  sparse attention is variable-length, so objects never attend to each other);
- the decoders one object per call (grouping objects under the mesh decoder's 42,000-voxel
  limit was measured no faster; ``DECODER_GROUP_VOXELS``), ``streams`` calls side by side on
  their own CUDA streams (``decode_in_order``).

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
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

MESH_DECODER_MAX_VOXELS = 42_000  # upstream: max(int32) / (64 * 768), per decoder call
# Voxels per decoder call. Measured on the H200 (bench/gpu.py, 8 objects of ~20k voxels): two
# objects per call took 1.5x the time of one call per object, so by default each object is
# decoded alone (a group always holds at least one object); raise it to try larger groups.
DECODER_GROUP_VOXELS = 1
# Post-process each object while the next ones decode (true), or only after a chunk's last
# decoder call (false: the decoders' kernel launches then never wait on the threads' GIL).
POSTPROCESS_OVERLAP = True
_PIPELINE_MODULE = "sam3d_objects.pipeline.inference_pipeline"
_CFG_MODULE = "sam3d_objects.model.backbone.generator.classifier_free_guidance"


def chunks(count: int, size: int) -> list[range]:
    """Object indices ``0..count-1`` in consecutive runs of at most ``size``."""
    size = max(1, size)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def decoder_groups(voxels: Sequence[int], limit: int = MESH_DECODER_MAX_VOXELS) -> list[list[int]]:
    """Consecutive objects grouped so each group's voxels stay within ``limit``."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(voxels):
        if groups and total + n <= limit:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


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

    ss_gen._generate_noise, slat_gen._generate_noise = stage1_noise, stage2_noise
    module.prune_sparse_structure = _per_object(prune)
    module.downsample_sparse_structure = _per_object(downsample)
    try:
        yield
    finally:
        ss_gen._generate_noise, slat_gen._generate_noise = ss_noise, slat_noise
        module.prune_sparse_structure, module.downsample_sparse_structure = prune, downsample


def _pairable(cfg) -> bool:
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


def _pack_sparse(x, args_cond):
    """Stage 2: the packed voxels twice, the copy's batch indices after the real objects'."""
    import torch

    cond, coords = args_cond[0], args_cond[-1]
    objects = cond.shape[0]
    shifted = np.array(coords, copy=True)
    shifted[:, 0] += objects
    args = (torch.cat([cond, torch.zeros_like(cond)]), *args_cond[1:-1])
    return torch.cat([x, x], dim=1), (*args, np.concatenate([coords, shifted]))


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
    """Both generators' guided steps as one backbone call each (see the module docstring)."""
    patched: list[tuple[Any, Any]] = []  # (cfg, its own inner_forward: upstream's compiled one)
    if enabled:
        plans = {
            "ss_generator": (_pack_dense, _unpack_dense, _dense_size),
            "slat_generator": (_pack_sparse, _unpack_sparse, lambda x: x.shape[1]),
        }
        models = dict(getattr(pipeline, "models", {}))  # upstream's is a ModuleDict: no .get
        for name, (pack, unpack, size) in plans.items():
            cfg = getattr(models.get(name), "reverse_fn", None)
            if cfg is not None and _pairable(cfg):
                patched.append((cfg, cfg.__dict__.get("inner_forward")))
                cfg.inner_forward = _paired_inner_forward(cfg, pack, unpack, size)
    try:
        yield [type(cfg).__name__ for cfg, _ in patched]
    finally:
        for cfg, own in patched:
            if own is None:
                del cfg.inner_forward  # back to the class's method
            else:
                cfg.inner_forward = own


def _dense_size(x) -> int:
    first = next(iter(x.values())) if isinstance(x, dict) else x
    return first.shape[0]


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


def generate_outputs(
    pipeline,
    image: np.ndarray,
    masks: np.ndarray,
    seeds: Sequence[int],
    kwargs: Mapping[str, Any],
    *,
    chunk_size: int,
    pointmap=None,
    pair_cfg: bool = True,
    finish: Callable[[dict], Any] | None = None,
    threads: int = 4,
    streams: int = 2,
) -> Iterator[Any]:
    """One upstream-shaped output dict per mask (or ``finish`` of it), in order, chunk by chunk.

    ``kwargs`` are upstream ``run()`` keyword arguments (``run_kwargs``); ``pointmap`` an
    optional H x W x 3 tensor in PyTorch3D's camera frame (else MoGe estimates it, once).
    ``pair_cfg``: guided steps as one backbone call (``cfg_pairs``). The CPU part after the
    decoders (upstream's GLB conversion, then ``finish``) runs on ``threads`` threads, one
    object each, so a chunk's objects are finished side by side instead of one after another.
    ``streams``: decoder calls in flight at once, each on its own CUDA stream
    (``decode_in_order``).
    """
    import torch
    from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp

    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="sam3d-post")
    with pool, pipeline.device, cfg_pairs(pipeline, pair_cfg):
        rgba = np.concatenate([image[..., :3], np.full(image.shape[:2] + (1,), 255, np.uint8)], -1)
        pointmap_dict = pipeline.compute_pointmap(rgba, pointmap)  # once per image
        points = pointmap_dict["pointmap"]
        pts = type(pipeline)._down_sample_img(points).cpu().permute(1, 2, 0)
        pts_colors = (
            type(pipeline)._down_sample_img(pointmap_dict["pts_color"]).cpu().permute(1, 2, 0)
        )
        rgb = torch.from_numpy(image[..., :3]).permute(2, 0, 1).float().div_(255.0)
        for chunk in chunks(len(masks), chunk_size):
            pending = _generate_chunk(
                pipeline, sp, rgb, points, masks, chunk, seeds, kwargs, pts, pts_colors, streams
            )
            if not POSTPROCESS_OVERLAP:
                pending = list(pending)
            futures = [pool.submit(_finish, pipeline, kwargs, out, finish) for out in pending]
            for future in futures:
                yield future.result()


def _finish(pipeline, kwargs, output: dict, finish):
    """Upstream's post-processing of one decoded object (its GLB), then ``finish``."""
    output.update(
        pipeline.postprocess_slat_output(
            output,
            kwargs.get("with_mesh_postprocess", False),
            kwargs.get("with_texture_baking", False),
            kwargs.get("use_vertex_color", True),
        )
    )
    return finish(output) if finish is not None else output


def _generate_chunk(
    pipeline, sp, rgb, points, masks, chunk, seeds, kwargs, pts, pts_colors, streams
):
    """The chunk's objects through stage 1, stage 2 and the decoders: decoded dicts, in order."""
    import torch

    ss_items, slat_items = [], []
    for i in chunk:
        mask = torch.from_numpy(np.ascontiguousarray(masks[i])).float()[None]
        ss_items.append(_object_input(pipeline, pipeline.ss_preprocessor, rgb, mask, points))
        slat_items.append(_object_input(pipeline, pipeline.slat_preprocessor, rgb, mask, None))
    ss_input, slat_input = _stack(ss_items), _stack(slat_items)
    del ss_items, slat_items
    chunk_seeds = [int(seeds[i]) for i in chunk]
    voxel_counts: list[int] = []
    with _batch_aware(pipeline, chunk_seeds, voxel_counts):
        ss = pipeline.sample_sparse_structure(
            ss_input,
            inference_steps=kwargs.get("stage1_inference_steps"),
            use_distillation=kwargs.get("use_stage1_distillation", False),
        )
        coords = ss["coords"]
        batch = coords[:, 0]
        voxel_counts.extend(int((batch == b).sum()) for b in range(len(chunk)))
        empty = [chunk[b] for b, n in enumerate(voxel_counts) if n == 0]
        if empty:
            from jobs.errors import ErrorCode, Sam3dError

            raise Sam3dError(
                ErrorCode.BACKEND_FAILED, f"SAM 3D found no voxels for objects {empty}"
            )
        ss.update(_decode_poses(pipeline, ss, ss_input, len(chunk)))
        factor = ss["downsample_factor"]
        ss["scale"] = ss["scale"] * (factor if torch.is_tensor(factor) else float(factor))
        slat = pipeline.sample_slat(
            slat_input,
            coords,
            inference_steps=kwargs.get("stage2_inference_steps"),
            use_distillation=kwargs.get("use_stage2_distillation", False),
        )
    formats = kwargs.get("decode_formats") or pipeline.decode_formats

    def decoder_input(group: list[int]):
        select = torch.isin(batch, torch.tensor(group, device=batch.device))
        remap = torch.full((len(chunk),), -1, dtype=coords.dtype, device=coords.device)
        remap[torch.tensor(group, device=coords.device)] = torch.arange(
            len(group), dtype=coords.dtype, device=coords.device
        )
        sub_coords = coords[select].clone()
        sub_coords[:, 0] = remap[sub_coords[:, 0].long()]
        return sp.SparseTensor(coords=sub_coords, feats=slat.feats[select])

    groups = decoder_groups(voxel_counts, min(DECODER_GROUP_VOXELS, MESH_DECODER_MAX_VOXELS))
    for group, decoded in decode_in_order(pipeline, groups, decoder_input, formats, streams):
        for j, b in enumerate(group):
            one = {key: [values[j]] for key, values in decoded.items()}
            pose = {
                key: ss[key][b : b + 1]
                for key in ("rotation", "translation", "scale")
                if torch.is_tensor(ss.get(key))
            }
            yield {
                **pose,
                **one,
                "coords": coords[batch == b],
                "pointmap": pts,
                "pointmap_colors": pts_colors,
            }
        del decoded


def decode_in_order(pipeline, groups, make_input, formats, streams: int):
    """``(group, decoded)`` for each group of objects, in order.

    The decoders leave the GPU idle much of the time: sparse convolution's index building,
    FlexiCubes and the window partitions synchronise with the host hundreds of times per
    object (bench/gpu.py --profile: 85 ms of GPU work in 209 ms per object). With ``streams``
    above one, that many calls run side by side, each on its own thread and CUDA stream, so
    one call's kernels fill another's waits. Each call waits for stage 2's output (an event on
    the caller's stream) and finishes on its stream before its result is handed on, so the
    consumers (the post-processing threads, on their default streams) read complete tensors.
    """
    import threading

    import torch

    if streams <= 1 or len(groups) <= 1:
        for group in groups:
            yield group, pipeline.decode_slat(make_input(group), formats)
        return
    ready = torch.cuda.Event()
    ready.record()
    local = threading.local()

    def decode(group):
        stream = getattr(local, "stream", None)
        if stream is None:
            stream = local.stream = torch.cuda.Stream()
        stream.wait_event(ready)
        # The default device and no_grad are per thread: set them here as the caller has.
        with pipeline.device, torch.no_grad(), torch.cuda.stream(stream):
            decoded = pipeline.decode_slat(make_input(group), formats)
        stream.synchronize()
        return decoded

    with ThreadPoolExecutor(min(streams, len(groups)), thread_name_prefix="sam3d-decode") as pool:
        futures = [pool.submit(decode, group) for group in groups]
        try:
            for group, future in zip(groups, futures, strict=True):
                yield group, future.result()
        finally:
            for future in futures:
                future.cancel()
