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
  CUDA streams, beside the next part's flows (``_Decoder``, ``generate_outputs``).

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
import functools
import importlib
import sys
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

MESH_DECODER_MAX_VOXELS = 42_000  # upstream: max(int32) / (64 * 768), per decoder call
# Voxels per decoder call (a group always holds at least one object): with the batched
# trunks, one call of the mesh decoder's tail; without, one whole ``decode_slat``. Measured on
# the H200 (bench/gpu.py, 8 fast objects of ~20-27k voxels, so two a call at upstream's 42k;
# shells; 2026-12-02): with meshes of a real object's size (``--shell-surface``), two a call
# 4.24 s a job against 4.46 s (5 interleaved rounds), and with 3 streams as well 4.37 against
# 4.75 s (3 rounds); with random weights' 1.9M-vertex meshes, two a call on 3 streams 4.51 s
# against 4.35 s, 6 GB more at peak (3 rounds). Mixed, within 5-8 %: one object a call stays
# the default until real weights settle it (bench ways ``ours-group``, ``ours-3streams``).
DECODER_GROUP_VOXELS = 1
# With a number: a chunk of at least twice that many objects goes through in two parts, the
# second part's flows beside the first part's decoders (``generate_outputs``). None (the
# default): chunks stay whole. Measured on the H200, 8 fast objects (bench/gpu.py, random
# weights, shells): in two parts of 4, 5.17 s a job; whole, 4.43 s. The second part's flows
# lose more to the decoders' threads (host time, the GIL) than the overlap wins back.
PIPELINE_MIN_PART: int | None = None
# While a job's threads share the interpreter, a thread that wants the GIL waits up to this
# long for the one holding it; None keeps Python's own (5 ms). Measured on the H200 with the
# batched decoder trunks (bench/gpu.py, 8 fast objects, shells): 5 ms was faster than 0.5 ms
# in all three runs (4.24 against 4.58 s, 4.29 against 4.78, 3.98 against 4.15). With whole
# decoders on the threads (before the trunks), 0.5 ms had looked better (4.43 s).
SWITCH_INTERVAL_S: float | None = None
# Both decoders' transformer trunks over the whole part in one call each (the Gaussian
# decoder whole, the mesh decoder up to its upsampling), then the mesh decoder's upsampling
# and FlexiCubes one object per call on the decoder streams. False: every decoder call takes
# one object (or a group, ``DECODER_GROUP_VOXELS``) through upstream's ``decode_slat``.
BATCHED_TRUNKS = True
GAUSSIAN_FORMATS = ("gaussian", "gaussian_4")
# Threads for the host work beside the flows: the objects' preprocessing, the poses.
PREP_THREADS = 4
_PIPELINE_MODULE = "sam3d_objects.pipeline.inference_pipeline"
_CFG_MODULE = "sam3d_objects.model.backbone.generator.classifier_free_guidance"
_VAE_PACKAGE = "sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae"


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


def _pack_sparse(x, args_cond, memo: dict | None = None):
    """Stage 2: the packed voxels twice, the copy's batch indices after the real objects'.
    ``memo``: the packed coordinates by the identity of the coordinates they pack, so every
    step gets the same array (``sam3d_sparse`` builds the sparse structure once per array)."""
    import torch

    cond, coords = args_cond[0], args_cond[-1]
    objects = cond.shape[0]
    packed = memo.get(id(coords)) if memo is not None else None
    if packed is None or packed[0] is not coords:
        shifted = np.array(coords, copy=True)
        shifted[:, 0] += objects
        packed = (coords, np.concatenate([coords, shifted]))
        if memo is not None:
            memo[id(coords)] = packed  # holds ``coords``: its id stays its own
    args = (torch.cat([cond, torch.zeros_like(cond)]), *args_cond[1:-1])
    return torch.cat([x, x], dim=1), (*args, packed[1])


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
            "slat_generator": (
                functools.partial(_pack_sparse, memo={}),  # for this context only
                _unpack_sparse,
                lambda x: x.shape[1],
            ),
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


def parts(count: int, chunk_size: int) -> list[range]:
    """Object indices in the parts they go through SAM 3D in: chunks of at most ``chunk_size``
    (what the free memory holds); with ``PIPELINE_MIN_PART`` set, halved from twice that on,
    so that one part's flows run while the part before it decodes (``generate_outputs``)."""
    size = max(1, min(chunk_size, count))
    if PIPELINE_MIN_PART is not None and size >= 2 * PIPELINE_MIN_PART:
        size = max(PIPELINE_MIN_PART, -(-size // 2))
    return chunks(count, size)


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
    disabled: Collection[str] = (),
) -> Iterator[Any]:
    """One upstream-shaped output dict per mask (or ``finish`` of it), in order, part by part.
    ``disabled``: fast paths the worker found off at setup (``sam3d_surface``), by name.

    ``kwargs`` are upstream ``run()`` keyword arguments (``run_kwargs``); ``pointmap`` an
    optional H x W x 3 tensor in PyTorch3D's camera frame (else MoGe estimates it, once).
    ``pair_cfg``: guided steps as one backbone call (``cfg_pairs``).

    Four kinds of work overlap, each where it leaves the others room:

    - this thread runs each part's flows (stage 1 and stage 2: large kernels, little host
      work) on the default CUDA stream, then goes on to the next part (``parts``: by default
      the next memory chunk) while this part decodes;
    - this thread also runs the part's decoder trunks (``_Decoder``), then ``streams``
      threads run the mesh decoder's tails, one object each, each thread on its own CUDA
      stream. The tails synchronise with the host hundreds of times per object (sparse
      convolution's index building, FlexiCubes), so alone they leave the GPU idle; beside
      each other (and the next part's flows) they fill its gaps. ``streams=0``: decoded on
      this thread, in turn;
    - ``PREP_THREADS`` threads run the objects' preprocessing side by side, and the poses
      while stage 2 runs;
    - ``threads`` threads run the host-side part after the decoders (upstream's GLB
      conversion, then ``finish``), one object each.

    Memory: a part's flows and the part before it's decoders are on the GPU together, which is
    why, with ``PIPELINE_MIN_PART`` set, a chunk that fits the free memory is halved into
    parts. Whole chunks of a job larger than one chunk share the GPU the same way; the
    reserve (``SAM3D_GPU_RESERVE_GB``) holds the decoders' working memory (measured on the
    H200 for 8 objects with the trunks: about 7 GB with one object per tail on 2 streams, the
    default; 12.3 GB with two per tail on 3 streams).
    """
    from sam3d_objects.model.backbone.tdfy_dit.modules import sparse as sp

    from worker.backends import sam3d_sparse

    with contextlib.ExitStack() as stack:
        post = ThreadPoolExecutor(max(1, threads), thread_name_prefix="sam3d-post")
        stack.callback(post.shutdown, wait=True, cancel_futures=True)
        decoders = None
        if streams > 0:
            decoders = ThreadPoolExecutor(streams, thread_name_prefix="sam3d-decode")
            stack.callback(decoders.shutdown, wait=True, cancel_futures=True)
        # Host work off the flows' thread: each object's preprocessing, the poses.
        prep = ThreadPoolExecutor(PREP_THREADS, thread_name_prefix="sam3d-prep")
        stack.callback(prep.shutdown, wait=True, cancel_futures=True)
        stack.enter_context(pipeline.device)
        stack.enter_context(cfg_pairs(pipeline, pair_cfg and "cfg_pairs" not in disabled))
        for path, patch in (
            ("gathered_broadcasts", sam3d_sparse.gathered_broadcasts),
            ("row_group_norms", sam3d_sparse.row_group_norms),
        ):
            stack.enter_context(patch(False if path in disabled else None))
        stack.enter_context(shared_image_rows(pipeline, "shared_image_rows" not in disabled))
        if SWITCH_INTERVAL_S is not None:
            stack.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(SWITCH_INTERVAL_S)
        rgb, points, shared = image_inputs(pipeline, image, pointmap)
        decoder = _Decoder(pipeline, sp, kwargs, finish, post, decoders, shared)
        if "mesh_trunks" in disabled:
            decoder.mesh = None  # whole upstream decode_slat calls
        queue: deque = deque()  # per decoder call, in order: its objects' finished futures
        for part in parts(len(masks), chunk_size):
            sampled = _sample_part(pipeline, rgb, points, masks, part, seeds, kwargs, prep)
            queue.extend(decoder.submit(sampled))
            del sampled
            while queue and queue[0].done():
                yield from (future.result() for future in queue.popleft().result())
        while queue:
            yield from (future.result() for future in queue.popleft().result())


_DINO_MODULE = "sam3d_objects.model.backbone.dit.embedder.dino"
# Read at call time (``shared_image_rows``; the bench's way ``ours-dupe`` turns it off).
SHARED_IMAGE_ROWS = True


def _once_for_equal_rows(own):
    """``own`` (an image encoder's forward) on the first row alone where every row of the
    batch is the same image, its output repeated; else on the batch."""
    import torch

    def forward(x, **kwargs):
        if torch.is_tensor(x) and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
            one = own(x[:1], **kwargs)
            return one.expand(x.shape[0], *one.shape[1:]).contiguous()
        return own(x, **kwargs)

    return forward


def dino_encoders(pipeline) -> list:
    """The condition embedders' DINO image encoders, upstream's own class and forward, each
    once (an encoder two embedders share is one); none where upstream has no such class."""
    try:
        dino = importlib.import_module(_DINO_MODULE)
    except ImportError:
        return []
    embedders = dict(getattr(pipeline, "condition_embedders", None) or {})
    found = {
        id(m): m
        for e in embedders.values()
        if e is not None and hasattr(e, "modules")
        for m in e.modules()
        if type(m).forward is dino.Dino.forward and "forward" not in m.__dict__
    }
    return list(found.values())


@contextlib.contextmanager
def shared_image_rows(pipeline, enabled: bool = True):
    """Within: the condition embedders' DINO encoders run once on an image that every object
    of the batch shares. Each object's condition holds the full photo (its "rgb_image"
    input) besides its own crop and masks: the same 518 px image for every object of a
    part, which upstream's batch would encode once per object (one of the four DINO passes
    per object in each of the two embedders). The comparison (``torch.equal``) costs one
    read-back per encoder call; the output equals a batch-of-one pass, as ``run()`` has it."""
    encoders = dino_encoders(pipeline) if enabled and SHARED_IMAGE_ROWS else []
    for encoder in encoders:
        encoder.forward = _once_for_equal_rows(encoder.forward)
    try:
        yield len(encoders)
    finally:
        for encoder in encoders:
            del encoder.forward


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
    (the compiled blocks' warm-up: ``sam3d_compile.warm_up``); upstream's
    ``sample_sparse_structure`` output."""
    import torch

    with pipeline.device:
        batch = {k: torch.cat([v] * count) for k, v in ss_input.items()}
        return pipeline.sample_sparse_structure(
            batch,
            inference_steps=kwargs.get("stage1_inference_steps"),
            use_distillation=kwargs.get("use_stage1_distillation", False),
        )


def _mesh_trunk(pipeline, formats) -> tuple[Callable, Callable] | None:
    """The mesh decoder as (trunk, tail) when it is upstream's ``SLatMeshDecoder`` unchanged:
    the trunk, its sparse transformer, takes any number of objects (windowed attention never
    crosses objects; 768 channels a voxel); the tail, its upsampling to 4x the resolution and
    FlexiCubes, is what the 42,000-voxel limit is for, so it goes one object per call. Their
    composition is upstream's ``forward``. None where the mesh is not decoded or the decoder
    is another class (then whole upstream calls)."""
    model = dict(getattr(pipeline, "models", {})).get("slat_decoder_mesh")
    if "mesh" not in formats or model is None:
        return None
    try:
        mesh = importlib.import_module(f"{_VAE_PACKAGE}.decoder_mesh")
        base = importlib.import_module(f"{_VAE_PACKAGE}.base")
    except ImportError:
        return None
    if type(model).forward is not mesh.SLatMeshDecoder.forward:
        return None

    import torch

    def trunk(slat):
        # no_grad as upstream's decode_slat has it (its models load frozen: a safeguard).
        with torch.no_grad(), torch.profiler.record_function("sam3d:mesh_trunk"):
            return base.SparseTransformerBase.forward(model, slat)

    def tail(h, dtype):
        with torch.profiler.record_function("sam3d:mesh_tail"):
            for block in model.upsample:
                h = block(h)
            return model.to_representation(model.out_layer(h.type(dtype)))

    return trunk, tail


class _Decoder:
    """A part's decoder calls (``generate_outputs``), then each object's post-processing.

    With ``BATCHED_TRUNKS`` (and upstream's own mesh decoder), on the calling thread right
    after stage 2: the Gaussian decoder over the whole part (upstream's ``decode_slat`` with
    the Gaussian formats: a list of one ``Gaussian`` per object) and the mesh decoder's trunk;
    then one call per object of the mesh decoder's tail on the decoder streams. Otherwise one
    ``decode_slat`` of every format per object (or group)."""

    def __init__(self, pipeline, sp, kwargs, finish, post, pool, shared) -> None:
        import threading

        self.pipeline, self.sp, self.kwargs, self.finish = pipeline, sp, kwargs, finish
        self.post, self.pool, self.shared = post, pool, shared
        self.formats = list(kwargs.get("decode_formats") or pipeline.decode_formats)
        self.mesh = _mesh_trunk(pipeline, self.formats) if BATCHED_TRUNKS else None
        self.local = threading.local()  # each decoder thread's CUDA stream

    def submit(self, sampled: dict) -> list[Future]:
        """One future per decoder call, in order: its objects' post-processing futures."""
        import torch

        limit = min(DECODER_GROUP_VOXELS, MESH_DECODER_MAX_VOXELS)
        groups = decoder_groups(sampled["voxel_counts"], limit)
        if self.mesh is not None:
            calls = self._trunks(sampled, groups)
        else:
            calls = [functools.partial(self._outputs, sampled, group) for group in groups]
        if self.pool is None:
            done = []
            for call in calls:
                future: Future = Future()
                future.set_result(self._post(call()))
                done.append(future)
            return done
        ready = torch.cuda.Event()
        ready.record()  # the part's stage 2 (and trunk) outputs, on this thread's stream
        futures: dict[int, Future] = {}
        for i in self._submit_order(groups, sampled["voxel_counts"]):
            futures[i] = self.pool.submit(self._on_stream, calls[i], ready)
        return [futures[i] for i in range(len(calls))]

    def _stream(self):
        """This thread's own CUDA stream (decoder and post threads each have one)."""
        import torch

        stream = getattr(self.local, "stream", None)
        if stream is None:
            stream = self.local.stream = torch.cuda.Stream()
        return stream

    def _on_stream(self, call: Callable[[], list[dict]], ready) -> list[Future]:
        import torch

        stream = self._stream()
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            outputs = _threaded(self.pipeline, call)
        stream.synchronize()  # complete before other threads' streams read them
        return self._post(outputs)

    def _post(self, outputs: list[dict]) -> list[Future]:
        args = (self.pipeline, self.kwargs)
        submit = self.post.submit
        if self.pool is None:  # decoded on the flows' thread, in turn: its stream
            return [submit(_finish, *args, output, self.finish) for output in outputs]
        return [submit(self._finish_on_stream, *args, output, self.finish) for output in outputs]

    def _finish_on_stream(self, *args):
        """``_finish`` with this post thread's GPU work (the Gaussians' conversion, the copies
        to the host) on its own stream, not queued behind the next part's flows on the default
        one. Its inputs are complete: the decoder thread synchronised its stream."""
        import torch

        with torch.cuda.stream(self._stream()):
            return _finish(*args)

    def _select(self, sampled: dict, group: list[int], feats):
        """The group's objects of a part-wide sparse tensor's ``feats``, batch indices 0..n-1."""
        import torch

        coords, batch = sampled["coords"], sampled["batch"]
        select = torch.isin(batch, torch.tensor(group, device=batch.device))
        remap = torch.full((len(sampled["part"]),), -1, dtype=coords.dtype, device=coords.device)
        remap[torch.tensor(group, device=coords.device)] = torch.arange(
            len(group), dtype=coords.dtype, device=coords.device
        )
        sub_coords = coords[select].clone()
        sub_coords[:, 0] = remap[sub_coords[:, 0].long()]
        return self.sp.SparseTensor(coords=sub_coords, feats=feats[select])

    def _output(self, sampled: dict, b: int, decoded: dict) -> dict:
        """Object ``b``'s upstream-shaped output dict, ``decoded`` its formats."""
        import torch

        ss, coords, batch = sampled["ss"], sampled["coords"], sampled["batch"]
        pose = {
            key: ss[key][b : b + 1]
            for key in ("rotation", "translation", "scale")
            if torch.is_tensor(ss.get(key))
        }
        return {**pose, **decoded, "coords": coords[batch == b], **self.shared}

    def _outputs(self, sampled: dict, group: list[int]) -> list[dict]:
        """The group's objects decoded by upstream's ``decode_slat``: one output dict each."""
        slat = self._select(sampled, group, sampled["slat"].feats)
        decoded = self.pipeline.decode_slat(slat, self.formats)
        return [
            self._output(sampled, b, {key: [values[j]] for key, values in decoded.items()})
            for j, b in enumerate(group)
        ]

    def _trunks(self, sampled: dict, groups: list[list[int]]) -> list[Callable[[], list[dict]]]:
        """The part-wide decoder work, now; one call per group for the mesh tails."""
        slat = sampled["slat"]
        gaussian = [f for f in self.formats if f in GAUSSIAN_FORMATS]
        splats = self.pipeline.decode_slat(slat, gaussian) if gaussian else {}
        trunk, tail = self.mesh
        h = trunk(slat)
        dtype = slat.feats.dtype

        def tails(group: list[int]) -> list[dict]:
            meshes = tail(self._select(sampled, group, h.feats), dtype)
            return [
                self._output(sampled, b, {"mesh": [mesh], **{k: [v[b]] for k, v in splats.items()}})
                for b, mesh in zip(group, meshes, strict=True)
            ]

        return [functools.partial(tails, group) for group in groups]

    def _submit_order(self, groups: list[list[int]], counts: list[int]) -> list[int]:
        """Largest tail calls first, so the streams finish together."""
        if self.mesh is None:
            return list(range(len(groups)))
        totals = [sum(counts[b] for b in group) for group in groups]
        return sorted(range(len(groups)), key=lambda i: -totals[i])


def _finish(pipeline, kwargs, output: dict, finish):
    """Upstream's post-processing of one decoded object (its GLB), then ``finish``. Its mesh
    comes to the host first through page-locked memory (``host_copy``): upstream's GLB
    conversion then finds it there (its ``.cpu()`` calls copy nothing)."""
    _mesh_to_host(output)
    output.update(
        pipeline.postprocess_slat_output(
            output,
            kwargs.get("with_mesh_postprocess", False),
            kwargs.get("with_texture_baking", False),
            kwargs.get("use_vertex_color", True),
        )
    )
    return finish(output) if finish is not None else output


MESH_TENSORS = ("vertices", "faces", "vertex_attrs")  # what upstream's GLB conversion reads


def _mesh_to_host(output: dict) -> None:
    import torch

    from worker.backends.sam3d import host_copy

    for mesh in output.get("mesh") or []:
        for name in MESH_TENSORS:
            value = getattr(mesh, name, None)
            if torch.is_tensor(value) and value.is_cuda:
                setattr(mesh, name, torch.from_numpy(host_copy(value)))


def _threaded(pipeline, fn, *args):
    """``fn(*args)`` on a helper thread as on the caller's: the default device and no_grad
    are per thread in torch. (So is the CUDA stream: the default one unless the thread has
    entered another, as the decoder threads do.)"""
    import torch

    with pipeline.device, torch.no_grad():
        return fn(*args)


def _stage_input(pipeline, stage: str, rgb, points, mask: np.ndarray) -> dict:
    """One object's input to ``stage`` ("ss": stage 1, with the pointmap; "slat": stage 2,
    without), through upstream's preprocessor for it."""
    preprocessor = getattr(pipeline, f"{stage}_preprocessor")
    return _object_input(pipeline, preprocessor, rgb, _mask_tensor(mask), points)


def _mask_tensor(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask)).float()[None]


def _sample_part(pipeline, rgb, points, masks, part, seeds, kwargs, prep) -> dict:
    """The part's objects through stage 1 and stage 2, all in one batch each. ``prep``: an
    executor for host work beside them (the objects' preprocessing, side by side: stage 1's
    first, stage 2's while stage 1 runs; the poses, while stage 2 runs: its result is not
    needed before the decoders)."""
    import torch

    from worker.backends import sam3d_attention, sam3d_sparse

    work = functools.partial(_threaded, pipeline, _stage_input, pipeline)
    ss_input = _stack(
        list(prep.map(functools.partial(work, "ss", rgb, points), [masks[i] for i in part]))
    )
    # stage 2's inputs on the prep threads while stage 1 runs (they need no stage-1 result)
    slat_items = [prep.submit(work, "slat", rgb, None, masks[i]) for i in part]
    part_seeds = [int(seeds[i]) for i in part]
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
        poses = prep.submit(_threaded, pipeline, _decode_poses, pipeline, ss, ss_input, len(part))
        slat_input = _stack([item.result() for item in slat_items])
        del slat_items
        steps = kwargs.get("stage2_inference_steps")
        with sam3d_attention.for_steps(steps), sam3d_sparse.reused_structure(pipeline):
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
        "coords": coords,
        "batch": batch,
        "ss": ss,
        "slat": slat,
        "voxel_counts": voxel_counts,
    }
