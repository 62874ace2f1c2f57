"""``sam3d``: Meta's SAM 3D Objects, loaded once per worker process and kept on its GPU.

Importing this module imports neither torch nor the upstream package: ``preflight`` checks
what it can without a CUDA context (files, packages, NVML), and ``setup`` does the heavy part
in the pool process. ``convert_output`` turns upstream's per-mask output into the project's
conventions (DESIGN "Outputs and their frames"):

- upstream splats live in a Z-up object frame; ours in glTF's Y-up frame: positions map
  (x, y, z) -> (x, z, -y) and every orientation is pre-multiplied by that rotation;
- upstream's GLB is already Y-up (its exporter applies the same map), so the mesh is kept;
- the pose (rotation w,x,y,z, translation, scale) is kept exactly; ``Pose.matrix`` gives the
  local-to-scene matrix, and the scene splats are rotated by it (see worker/assets/scene.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jobs.depth import DepthInput
from jobs.errors import ErrorCode, Sam3dError
from jobs.frames import Z_UP_TO_Y_UP, Camera, Pose, matrix_to_quat, quat_multiply
from jobs.settings import Settings
from worker.backends.base import Gaussians, Mesh, ObjectResult

log = logging.getLogger("sam3d.worker")

VERSION = "sam-3d-objects@1"
UPSTREAM_PACKAGE = "sam3d_objects"
REQUIREMENTS_FILE = "requirements/gpu.txt"
# pipeline.yaml names these relative to the checkpoint folder.
MODELS = ("ss_generator", "slat_generator", "ss_decoder", "slat_decoder_gs", "slat_decoder_mesh")
REQUIRED_FILES = ("pipeline.yaml",) + tuple(
    f"{m}.{ext}" for m in MODELS for ext in ("yaml", "ckpt")
)
GAUSSIAN_4_FILES = ("slat_decoder_gs_4.yaml", "slat_decoder_gs_4.ckpt")
DEFAULT_STEPS, FAST_STEPS = 25, 4
NO_COLOUR = (200, 200, 200, 255)  # upstream's GLB has no colour with post-processing on
DEFAULT_FOV_DEG = 60.0  # the camera when the pointmap has no valid point (inflate's default)


class PreflightError(Sam3dError):
    """The worker cannot run the model here; the message says what to fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(
            ErrorCode.PREFLIGHT_FAILED,
            "cannot start the sam3d backend:\n" + "\n".join(f"  - {p}" for p in problems),
        )
        self.problems = problems


# -- preflight ---------------------------------------------------------------------------------


def missing_checkpoint_files(checkpoint_dir: str | Path) -> list[str]:
    """Required files absent from the checkpoint folder (all of them if it does not exist)."""
    folder = Path(checkpoint_dir)
    return [name for name in REQUIRED_FILES if not (folder / name).is_file()]


def preflight(settings: Settings, *, gpu_index: int | None = None) -> dict[str, Any]:
    """Everything checkable before loading: raises ``PreflightError`` listing every problem.

    Uses NVML for the GPU (no CUDA context: safe in a forking parent).
    """
    problems: list[str] = []
    folder = settings.checkpoint_dir
    if not folder:
        problems.append(
            "SAM3D_CHECKPOINT_DIR is not set: point it at the folder with pipeline.yaml and "
            "the weights (see README, 'Running the real model')"
        )
    elif not Path(folder).is_dir():
        problems.append(f"checkpoint folder {folder} does not exist")
    else:
        missing = missing_checkpoint_files(folder)
        if missing:
            problems.append(
                f"checkpoint folder {folder} is incomplete; missing: {', '.join(missing)}"
            )
    from worker.backends.sam3d_upstream import ATTENTION_CHOICES, upstream_available

    if not upstream_available():
        problems.append(
            f"the SAM 3D Objects package ({UPSTREAM_PACKAGE}, or PyPI's sam3d which vendors it) "
            f"is not installed: pip install -r {REQUIREMENTS_FILE} (or use "
            "docker/worker-gpu.Dockerfile, or scripts/gpu_bundle.py for an offline host)"
        )
    if importlib.util.find_spec("torch") is None:
        problems.append(
            f"the PyTorch package (torch) is not installed: pip install -r {REQUIREMENTS_FILE}"
        )
    if settings.attn_backend not in ATTENTION_CHOICES:
        problems.append(
            f"SAM3D_ATTN_BACKEND={settings.attn_backend!r}: choose one of "
            + ", ".join(ATTENTION_CHOICES)
        )
    elif settings.attn_backend in ("flash_attn", "xformers") and not importlib.util.find_spec(
        settings.attn_backend
    ):
        problems.append(
            f"SAM3D_ATTN_BACKEND={settings.attn_backend} but {settings.attn_backend} is not "
            "installed (auto uses PyTorch's varlen attention instead)"
        )
    gpu = _nvml_gpu(
        gpu_index if gpu_index is not None else int(os.environ.get("SAM3D_GPU_INDEX", "0"))
    )
    if isinstance(gpu, str):
        problems.append(gpu)
    else:
        free_gb = gpu["memory_free_mb"] / 1024
        if free_gb < settings.min_free_gpu_gb:
            problems.append(
                f"GPU {gpu['index']} ({gpu['name']}) has {free_gb:.1f} GB free; SAM 3D needs "
                f"{settings.min_free_gpu_gb:g} GB (SAM3D_MIN_FREE_GPU_GB overrides)"
            )
    if problems:
        raise PreflightError(problems)
    return gpu


def _nvml_gpu(index: int) -> dict[str, Any] | str:
    """The GPU's facts, or a sentence saying why there is no usable CUDA device."""
    from worker.gpu import gpu_status

    try:
        import pynvml  # noqa: F401
    except ImportError:
        return "no CUDA device: NVML (nvidia-ml-py) is not installed, so no NVIDIA GPU can be seen"
    status = gpu_status(index)
    if status is None:
        return f"no CUDA device: no NVIDIA driver answers, or there is no GPU {index}"
    return status


# -- options -----------------------------------------------------------------------------------


def run_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """Our options as keyword arguments of upstream's ``pipeline.run``."""
    fast = bool(options.get("fast", False))
    default = FAST_STEPS if fast else DEFAULT_STEPS
    baking = bool(options.get("texture_baking", False))
    splats = "gaussian_4" if int(options.get("splats_per_voxel", 32)) == 4 else "gaussian"
    return {
        "seed": int(options.get("seed", 0)),
        "stage1_inference_steps": int(options.get("stage1_steps") or default),
        "stage2_inference_steps": int(options.get("stage2_steps") or default),
        "use_stage1_distillation": fast,
        "use_stage2_distillation": fast,
        "with_texture_baking": baking,
        "with_mesh_postprocess": bool(options.get("mesh_postprocess", False)),
        # Without baking, colour must come from the vertices (else the GLB has none).
        "use_vertex_color": not baking,
        # Upstream decodes a mesh only alongside 32-splat Gaussians (its GLB export needs them).
        "decode_formats": ["gaussian", "mesh"] + (["gaussian_4"] if splats == "gaussian_4" else []),
    }


# -- conversion --------------------------------------------------------------------------------

_Q_Z_UP_TO_Y_UP = matrix_to_quat(Z_UP_TO_Y_UP)
# q -> _Q_Z_UP_TO_Y_UP * q (the frame's rotation applied after the splat's) as a 4x4 matrix:
# column j is the product with the j-th unit quaternion.
_Q_LEFT = quat_multiply(_Q_Z_UP_TO_Y_UP, np.eye(4)).T


def _array(value: Any) -> np.ndarray:
    """A tensor (any device) or array as float64 numpy."""
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


# Device-to-host copies through page-locked memory (``host_copy``); False: ``tensor.cpu()``.
# Measured on the H200 (bench/gpu.py --profile 8 --profile-mode fast, 2026-12-03): a job's
# Gaussians, 48 MB an object, came back from pageable memory at 1.3 GB/s (37 ms each, on the
# post threads while the mesh tails ran); the copies of a job took 0.37 s of copy-engine time.
# The job time did not move with them (8 fast objects, 3 rounds interleaved: 3.58 s a job,
# 3.54 s with pageable copies, bench way ``ours-pageable``): those copies were off the
# critical path. On, for the copy engine they free.
PINNED_COPIES = True


def host_copy(tensor) -> np.ndarray:
    """``tensor`` on the host as numpy: from the GPU through a page-locked buffer of torch's
    caching host allocator (reused from object to object), on the calling thread's stream,
    complete when this returns. The array shares that buffer: it stays page-locked until the
    array is freed (the callers here keep it for one object's conversion)."""
    import torch

    tensor = tensor.detach()
    if not (PINNED_COPIES and tensor.is_cuda):
        return tensor.cpu().numpy()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()


def _linear(x, matrix: np.ndarray):
    """``x @ matrix.T`` for the rows of ``x`` (a tensor) as float32 products and sums over
    the matrix's nonzero entries: no matrix kernel, so no TF32 rounding on GPUs that allow it
    (the matrices here are a signed permutation, exact, and the frame's quaternion: two
    terms an entry, within an ulp of float64)."""
    import torch

    columns = []
    for row in matrix:
        terms = [x[:, j] * float(c) for j, c in enumerate(row) if c != 0]
        columns.append(sum(terms[1:], terms[0]) if terms else torch.zeros_like(x[:, 0]))
    return torch.stack(columns, dim=1)


def convert_gaussians(gs: Any) -> Gaussians:
    """Upstream ``Gaussian`` (Z-up object frame, activated through its getters) -> ours (Y-up).

    Computed where upstream's tensors are (the GPU), then copied to the host as one block:
    the host-side part of a job's last objects is what its GPU waits behind."""
    import torch

    from worker.assets.ply import SH_C0

    def tensor(value):
        value = value.detach() if hasattr(value, "detach") else torch.as_tensor(value)
        return value.float()

    xyz = tensor(gs.get_xyz)
    rotation = tensor(gs.get_rotation)  # normalised, w,x,y,z
    count = len(xyz)
    dc = tensor(gs._features_dc).reshape(count, -1)[:, :3]
    with torch.no_grad():
        packed = torch.cat(
            [
                _linear(xyz, Z_UP_TO_Y_UP),
                _linear(rotation, _Q_LEFT),
                tensor(gs.get_scaling).reshape(count, 3),
                tensor(gs.get_opacity).reshape(count, 1),
                dc * SH_C0 + 0.5,
            ],
            dim=1,
        )
        host = host_copy(packed)
    columns = np.split(host, [3, 7, 10, 11], axis=1)
    positions, rotations, scales, opacity, colors = (np.ascontiguousarray(c) for c in columns)
    return Gaussians(
        positions=positions,
        rotations=rotations,
        scales=scales,
        opacities=opacity.reshape(-1),
        colors=colors,
    )


def convert_mesh(glb: Any) -> Mesh:
    """Upstream's ``trimesh.Trimesh`` (already Y-up) -> our mesh with vertex colours."""
    if glb is None:
        raise Sam3dError(ErrorCode.BACKEND_FAILED, "SAM 3D returned no mesh")
    vertices = np.asarray(glb.vertices, dtype=np.float32)
    faces = np.asarray(glb.faces, dtype=np.int32)
    visual = getattr(glb, "visual", None)
    colors = None
    if visual is not None and getattr(visual, "kind", None) == "texture":
        visual = visual.to_color()  # baked texture sampled at the vertices
    if visual is not None and getattr(visual, "kind", None) == "vertex":
        colors = np.asarray(visual.vertex_colors, dtype=np.uint8)
    if colors is None or len(colors) != len(vertices):
        colors = np.tile(np.array(NO_COLOUR, np.uint8), (len(vertices), 1))
    return Mesh(vertices=vertices, faces=faces, colors=colors)


def convert_pose(output: Mapping[str, Any]) -> Pose:
    rotation = _array(output["rotation"]).reshape(4)
    rotation = rotation / np.linalg.norm(rotation)
    translation = _array(output["translation"]).reshape(3)
    scale = _array(output["scale"]).reshape(3)
    return Pose(
        tuple(map(float, rotation)), tuple(map(float, translation)), tuple(map(float, scale))
    )


def camera_from_pointmap(pointmap: Any, image_size: tuple[int, int]) -> Camera | None:
    """Pinhole intrinsics (pixels of the full image) fitted to upstream's pointmap, which is
    in PyTorch3D's camera frame (+X left, +Y up, +Z forward) and may be downsampled."""
    points = _array(pointmap)
    if points.ndim != 3 or points.shape[-1] != 3:
        return None
    height, width = image_size
    rows, cols = points.shape[:2]
    u = ((np.arange(cols) + 0.5) * width / cols)[None, :]  # pixel centres, full-image pixels
    v = ((np.arange(rows) + 0.5) * height / rows)[:, None]
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    ok = np.isfinite(points).all(-1) & (z > 1e-6)
    if ok.sum() < 16:
        return None
    # u = cx + fx * (-x / z),  v = cy - fy * (y / z)   (the manifest's OpenGL convention)
    a = -x[ok] / z[ok]
    b = y[ok] / z[ok]
    fits = (
        _line_fit(a, np.broadcast_to(u, ok.shape)[ok]),
        _line_fit(b, np.broadcast_to(v, ok.shape)[ok]),
    )
    if None in fits:
        return None  # every valid point on one line of sight: no focal length to fit
    (fx, cx), (neg_fy, cy) = fits
    return Camera(width, height, fx, -neg_fy, cx, cy)


def _line_fit(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """Least squares ``b ~ slope * a + intercept`` (``np.polyfit(a, b, 1)``, in closed form:
    about 10x faster on a megapixel pointmap). None where ``a`` does not vary."""
    mean_a, mean_b = a.mean(), b.mean()
    da = a - mean_a
    spread = float(np.dot(da, da))
    if not spread > 1e-12 * max(1.0, float(np.dot(a, a))):
        return None
    slope = float(np.dot(da, b - mean_b)) / spread
    return slope, float(mean_b - slope * mean_a)


def output_camera(output: Mapping[str, Any], image_size: tuple[int, int]) -> Camera:
    """The camera an upstream output's pose refers to: fitted to its pointmap."""
    pointmap = output.get("pointmap")
    camera = camera_from_pointmap(pointmap, image_size) if pointmap is not None else None
    if camera is None:
        # The depth model found no valid point (a blank photo; random weights): the pose
        # still refers to the camera frame, but nothing measured the intrinsics.
        log.warning("no valid pointmap: the manifest camera is the %g deg default", DEFAULT_FOV_DEG)
        camera = Camera.from_fov(image_size[1], image_size[0], DEFAULT_FOV_DEG)
    return camera


class ImageOutputs:
    """``convert_output`` for the objects of one image, whose outputs share one pointmap (the
    batched path's): its camera is fitted once, by the first object to need it."""

    def __init__(self, image_size: tuple[int, int], splats_per_voxel: int = 32) -> None:
        self.image_size, self.splats_per_voxel = image_size, splats_per_voxel
        self.lock = threading.Lock()
        self.fitted: tuple[Any, Camera] | None = None  # (pointmap, its camera)

    def __call__(self, output: Mapping[str, Any]) -> ObjectResult:
        pointmap = output.get("pointmap")
        with self.lock:  # the post threads convert side by side
            if self.fitted is None or self.fitted[0] is not pointmap:
                self.fitted = (pointmap, output_camera(output, self.image_size))
            camera = self.fitted[1]
        return convert_output(
            output, self.image_size, splats_per_voxel=self.splats_per_voxel, camera=camera
        )


def convert_output(
    output: Mapping[str, Any],
    image_size: tuple[int, int],
    *,
    splats_per_voxel: int = 32,
    camera: Camera | None = None,
) -> ObjectResult:
    """One upstream per-mask output dict -> our ObjectResult (frames converted exactly).
    ``camera``: the one ``output_camera`` gives, where the caller has it already."""
    key = "gs_4" if splats_per_voxel == 4 and output.get("gs_4") is not None else "gs"
    gs = output.get(key)
    if gs is None and output.get("gaussian"):
        gs = output["gaussian"][0]
    if gs is None:
        raise Sam3dError(ErrorCode.BACKEND_FAILED, "SAM 3D returned no Gaussians")
    if camera is None:
        camera = output_camera(output, image_size)
    return ObjectResult(
        mesh=convert_mesh(output.get("glb")),
        gaussians=convert_gaussians(gs),
        pose=convert_pose(output),
        camera=camera,
    )


# -- the backend -------------------------------------------------------------------------------


WARM_UP_OPTIONS = {"seed": 0, "fast": True, "stage1_steps": 2, "stage2_steps": 2}


class Sam3dBackend:
    """SAM 3D Objects on one GPU. ``setup`` builds the pipeline once and warms it up."""

    name = "sam3d"
    version = VERSION
    device = "cuda"

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        if self.settings.compile_model and self.settings.compile_flow:
            # upstream's compile takes in stage 1's guidance, blocks and all: one is enough
            self.settings = dataclasses.replace(self.settings, compile_flow=False)
        self.pipeline: Any = None
        self.attention = ""  # the attention backend in use, once set up
        # name -> sam3d_surface.FastPath, set by setup (heartbeat, GET /v1/backends)
        self.fast_paths: dict[str, Any] = {}

    def engaged(self, path: str) -> bool:
        """Whether fast path ``path`` runs: on by the settings now (bench/gpu.py's ways turn
        them off per job), and found usable at setup (before setup: the settings alone)."""
        on, _ = self._switches().get(path, (True, ""))
        fast = self.fast_paths.get(path)
        return on and (fast is None or fast.engaged)

    def _switches(self) -> dict[str, tuple[bool, str]]:
        """Each fast path: (on by the settings, why not when off)."""
        from worker.backends import sam3d_batch, sam3d_sparse

        s = self.settings
        return {
            "batched_flow": (s.batch_objects, "off: SAM3D_BATCH_OBJECTS=false"),
            "mesh_trunks": (sam3d_batch.BATCHED_TRUNKS, "off: sam3d_batch.BATCHED_TRUNKS"),
            "cfg_pairs": (s.cfg_pairs, "off: SAM3D_CFG_PAIRS=false"),
            "shared_image_rows": (
                sam3d_batch.SHARED_IMAGE_ROWS, "off: sam3d_batch.SHARED_IMAGE_ROWS"
            ),
            "gathered_broadcasts": (sam3d_sparse.GATHERED, "off: sam3d_sparse.GATHERED"),
            "row_group_norms": (
                sam3d_sparse.ROW_GROUP_NORMS, "off: sam3d_sparse.ROW_GROUP_NORMS"
            ),
            "varlen_attention": (
                self.attention == "varlen",
                f"attention is {self.attention} (SAM3D_ATTN_BACKEND={s.attn_backend})",
            ),
            "compile_flow": (s.compile_flow, "off: SAM3D_COMPILE_FLOW=false"),
        }  # fmt: skip

    def setup(self) -> None:
        preflight(self.settings)
        import torch

        from worker.backends import sam3d_surface
        from worker.backends import sam3d_upstream as upstream

        t0 = time.perf_counter()
        self.attention = upstream.import_upstream(self.settings.attn_backend)
        config = upstream.pipeline_config(
            self.settings.checkpoint_dir,
            dinov2_dir=self.settings.dinov2_dir,
            moge_path=self.settings.moge_path,
            compile_model=self.settings.compile_model,
        )
        log.info(
            "loading SAM 3D from %s (attention %s)", self.settings.checkpoint_dir, self.attention
        )
        paths = sam3d_surface.check_names(self._switches())  # refuses a default path gap
        self.pipeline = upstream.build_pipeline(config)
        self.fast_paths = sam3d_surface.check_pipeline(self.pipeline, paths)
        sam3d_surface.log_fast_paths(self.fast_paths)
        if self.engaged("compile_flow"):
            from worker.backends import sam3d_compile

            blocks = sam3d_compile.compile_flow(self.pipeline)
            log.info("stage 1's %d flow blocks under torch.compile", blocks)
        free, total = torch.cuda.mem_get_info()
        log.info(
            "SAM 3D loaded in %.1f s; GPU memory free %.1f of %.1f GB",
            time.perf_counter() - t0,
            free / 2**30,
            total / 2**30,
        )
        self._warm_up()

    def _warm_up(self) -> None:
        """One small run, so the first job does not pay for kernel selection and caches."""
        image = np.full((256, 256, 3), 127, np.uint8)
        mask = np.zeros((256, 256), bool)
        mask[64:192, 80:176] = True
        t0 = time.perf_counter()
        self._run(image, mask, WARM_UP_OPTIONS)
        if self.engaged("compile_flow"):  # the compiled blocks' graphs: batches of 1, then 2+
            from worker.backends import sam3d_compile

            sam3d_compile.warm_up(self.pipeline, image, mask, run_kwargs(WARM_UP_OPTIONS))
        log.info("warm-up in %.1f s", time.perf_counter() - t0)

    def camera(self, image: np.ndarray, options: Mapping[str, Any]) -> Camera | None:
        return None  # estimated by SAM 3D's depth model: each result carries it

    def _run(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        options: Mapping[str, Any],
        depth: DepthInput | None = None,
    ) -> dict:
        rgba = np.concatenate([image[..., :3], (mask.astype(np.uint8) * 255)[..., None]], -1)
        kwargs = run_kwargs(options)
        if depth is not None:  # metric: upstream skips MoGe and poses against these points
            import torch

            kwargs["pointmap"] = torch.from_numpy(depth.pointmap_pytorch3d())
        from worker.backends.sam3d_attention import for_steps

        with for_steps(kwargs["stage2_inference_steps"]):
            return self.pipeline.run(rgba, None, **kwargs)

    def generate(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        *,
        camera: Camera | None,
        seed: int,
        options: Mapping[str, Any],
        depth: DepthInput | None = None,
    ) -> ObjectResult:
        output = self._run(image, mask, {**options, "seed": seed}, depth)
        return convert_output(
            output, image.shape[:2], splats_per_voxel=int(options.get("splats_per_voxel", 32))
        )

    def chunk_size(self, count: int) -> int:
        """Objects per batch: ``SAM3D_MAX_BATCH_OBJECTS``, else what the free memory holds."""
        if self.settings.max_batch_objects > 0:
            return min(count, self.settings.max_batch_objects)
        import torch

        free, _ = torch.cuda.mem_get_info()
        free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # cached, unused
        room = free / 2**30 - self.settings.gpu_reserve_gb
        return max(1, min(count, int(room / self.settings.gpu_gb_per_object)))

    def generate_many(
        self,
        image: np.ndarray,
        masks: np.ndarray,
        *,
        camera: Camera | None,
        seeds: Sequence[int],
        options: Mapping[str, Any],
        depth: DepthInput | None = None,
    ) -> Iterator[ObjectResult]:
        """Every mask of the image in batches (worker/backends/sam3d_batch.py), in order; each
        object equals ``generate`` with its seed up to fp16 arithmetic."""
        from worker.backends.sam3d_batch import cfg_pairs, generate_outputs

        # Batching off, or one object (nothing to share): upstream's own run() per mask, its
        # guided steps paired up all the same.
        if len(masks) == 1 or not self.engaged("batched_flow"):
            for i in range(len(masks)):
                with cfg_pairs(self.pipeline, self.engaged("cfg_pairs")):
                    result = self.generate(
                        image, masks[i], camera=camera, seed=seeds[i], options=options, depth=depth
                    )
                yield result
            return

        pointmap = None
        if depth is not None:
            import torch

            pointmap = torch.from_numpy(depth.pointmap_pytorch3d())
        splats = int(options.get("splats_per_voxel", 32))
        outputs = generate_outputs(
            self.pipeline,
            image,
            masks,
            seeds,
            run_kwargs(options),
            chunk_size=self.chunk_size(len(masks)),
            pointmap=pointmap,
            pair_cfg=self.engaged("cfg_pairs"),
            finish=ImageOutputs(image.shape[:2], splats),
            threads=self.settings.postprocess_threads,
            streams=self.settings.decoder_streams,
            disabled=frozenset(n for n in self.fast_paths if not self.engaged(n)),
        )
        yield from outputs
