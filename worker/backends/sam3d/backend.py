"""``sam3d``: Meta's SAM 3D Objects, loaded once per worker process and kept on its GPU.

Importing this module imports neither torch nor the upstream package: ``preflight`` checks
what it can without a CUDA context, and ``setup`` does the heavy part in the pool process:
upstream imported (``upstream``), its surface checked (``surface``: the fast paths engaged),
the pipeline built and warmed up. ``generate`` is upstream's own ``run()`` for one mask;
``generate_many`` every mask of an image through the batched flow (``flow``); ``generate_batch``
the masks of several jobs' images in shared passes (``flow.generate_rows``, worker/batching.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jobs.depth import DepthInput
from jobs.frames import Camera
from jobs.settings import Settings
from worker.backends.base import BatchItem, ObjectResult
from worker.backends.sam3d.convert import ImageOutputs, convert_output
from worker.backends.sam3d.preflight import preflight
from worker.backends.sam3d.tuning import Tuning

log = logging.getLogger("sam3d.worker")

VERSION = "sam-3d-objects@1"
DEFAULT_STEPS, FAST_STEPS = 25, 4


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
        self.tuning = Tuning.from_settings(self.settings)  # the batched path's knobs
        # name -> surface.FastPath, set by setup (heartbeat, GET /v1/backends)
        self.fast_paths: dict[str, Any] = {}

    def engaged(self, path: str) -> bool:
        """Whether fast path ``path`` runs: on by the settings now (bench/gpu.py's ways turn
        them off per job), and found usable at setup (before setup: the settings alone)."""
        on, _ = self._switches().get(path, (True, ""))
        fast = self.fast_paths.get(path)
        return on and (fast is None or fast.engaged)

    def fast_path_off(self, path: str, reason: str) -> None:
        """A fast path that switched itself off while running (a compile that failed)."""
        from worker.backends.sam3d.surface import FastPath

        self.fast_paths = {**self.fast_paths, path: FastPath(path, False, reason)}

    def _switches(self) -> dict[str, tuple[bool, str]]:
        """Each fast path: (on by the tuning and settings now, why not when off)."""
        s, t = self.settings, self.tuning
        return {
            "batched_flow": (t.batch_objects, "off: SAM3D_BATCH_OBJECTS=false"),
            "mesh_trunks": (t.batched_trunks, "off: Tuning.batched_trunks"),
            "cfg_pairs": (t.cfg_pairs, "off: SAM3D_CFG_PAIRS=false"),
            "shared_image_rows": (t.shared_image_rows, "off: Tuning.shared_image_rows"),
            "gathered_broadcasts": (t.gathered_broadcasts, "off: Tuning.gathered_broadcasts"),
            "row_group_norms": (t.row_group_norms, "off: Tuning.row_group_norms"),
            "step_exits": (t.step_exits, "off: Tuning.step_exits"),
            "varlen_attention": (
                self.attention == "varlen",
                f"attention is {self.attention} (SAM3D_ATTN_BACKEND={s.attn_backend})",
            ),
            "compile_flow": (s.compile_flow, "off: SAM3D_COMPILE_FLOW=false"),
        }

    def setup(self) -> None:
        preflight(self.settings)
        import torch

        from worker.backends.sam3d import surface, upstream

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
        paths = surface.check_names(self._switches())  # refuses a default path gap
        self.pipeline = upstream.build_pipeline(config)
        self.fast_paths = surface.check_pipeline(self.pipeline, paths)
        surface.log_fast_paths(self.fast_paths)
        if self.engaged("compile_flow"):
            from worker.backends.sam3d import flow_compile

            blocks = flow_compile.compile_flow(
                self.pipeline, on_fallback=lambda reason: self.fast_path_off("compile_flow", reason)
            )
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
            from worker.backends.sam3d import flow_compile

            flow_compile.warm_up(self.pipeline, image, mask, run_kwargs(WARM_UP_OPTIONS))
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
        from worker.backends.sam3d.attention import for_steps

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

    def batch_key(self, options: Mapping[str, Any]) -> str:
        """Jobs whose options give equal keys share passes (worker/batching.py): the same
        steps, modes and decoders; seeds may differ (each row draws its own noise)."""
        kwargs = {k: v for k, v in run_kwargs(options).items() if k != "seed"}
        kwargs["splats_per_voxel"] = int(options.get("splats_per_voxel", 32))
        return json.dumps(kwargs, sort_keys=True)

    def batch_capacity(self) -> int:
        """Objects of all jobs one cross-job batch may hold: what the free memory holds."""
        return self.chunk_size(1 << 20)

    def generate_batch(
        self,
        items: Sequence[BatchItem],
        *,
        options: Mapping[str, Any],
        leaving: Callable[[], Collection[str]] | None = None,
    ) -> Iterator[tuple[str, int, ObjectResult]]:
        """The objects of several jobs (``items``: each its own image, masks, seeds, depth) in
        shared passes (``flow.generate_rows``), as each part finishes, in item and mask order;
        rows of items that ``leaving()`` names leave at the next flow step (``step_exits``)."""
        from worker.backends.sam3d.flow import Row, generate_rows

        if sum(len(item.masks) for item in items) == 1 or not self.engaged("batched_flow"):
            # One object (nothing to share), or batching off: upstream's run() per object,
            # its guided steps paired, and a leaving item stopped at its next flow step.
            yield from self._one_by_one(items, options, leaving)
            return
        import torch

        splats = int(options.get("splats_per_voxel", 32))
        images, rows = [], []
        for k, item in enumerate(items):
            pointmap = None
            if item.depth is not None:
                pointmap = torch.from_numpy(item.depth.pointmap_pytorch3d())
            finish = ImageOutputs(item.image.shape[:2], splats, pinned=self.tuning.pinned_copies)
            images.append((item.image, pointmap, finish))
            rows += [Row(k, item.masks, p, int(item.seeds[p])) for p in range(len(item.masks))]

        def left() -> set[int]:
            names = set(leaving())
            return {k for k, item in enumerate(items) if item.key in names}

        for row, result in generate_rows(
            self.pipeline,
            images,
            rows,
            run_kwargs(options),
            chunk_size=self.chunk_size(len(rows)),
            tuning=self.tuning,
            disabled=frozenset(n for n in self.fast_paths if not self.engaged(n)),
            leaving=left if leaving is not None else None,
        ):
            yield items[rows[row].image].key, rows[row].pos, result

    def _one_by_one(self, items, options, leaving) -> Iterator[tuple[str, int, ObjectResult]]:
        from worker.backends.sam3d.exits import Leave, step_exits
        from worker.backends.sam3d.guidance import cfg_pairs

        exits = leaving is not None and self.engaged("step_exits")
        for item in items:

            def check(key: str = item.key) -> None:
                if key in leaving():
                    raise Leave

            for pos in range(len(item.masks)):
                if leaving is not None and item.key in leaving():
                    break
                try:
                    with (
                        cfg_pairs(self.pipeline, self.engaged("cfg_pairs")),
                        step_exits(self.pipeline, check, exits),
                    ):
                        result = self.generate(
                            item.image, item.masks[pos], camera=item.camera,
                            seed=item.seeds[pos], options=options, depth=item.depth,
                        )  # fmt: skip
                except Leave:
                    break
                yield item.key, pos, result

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
        """Every mask of the image in batches (``flow``), in order; each object equals
        ``generate`` with its seed up to fp16 arithmetic: ``generate_batch`` of one item."""
        item = BatchItem("", image, masks, list(seeds), camera, depth)
        for _, _, result in self.generate_batch([item], options=options):
            yield result
