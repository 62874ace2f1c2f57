"""The upstream surface: every upstream module, attribute and private name the ``sam3d``
backend and its fast paths use, in one list, checked once at setup.

Upstream (``sam3d_objects``, vendored in PyPI's ``sam3d``) is not ours and moves. Each name is
listed under what needs it: ``default`` (what loading the model and upstream's own ``run()``
need: missing, the worker refuses to start, exit code as the other preflight refusals) or a
fast path (missing: that fast path off, with a WARNING naming the missing names; the job
still runs, upstream's way). Beside the names, some fast paths check the built pipeline
(``check_pipeline``: the guidance classes, the mesh decoder, the image encoders they replace
parts of). The result is ``fast_paths``: each fast path's name, whether it is engaged and
why, logged at start, in the worker's heartbeat and in ``GET /v1/backends``.

tests/test_sam3d_surface.py checks every name here against the pinned upstream in
``.venv/upstream``, so an upstream update that drops one fails CI, not a job.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jobs.errors import ErrorCode, Sam3dError

log = logging.getLogger("sam3d.worker")

_P = "sam3d_objects"
_PIPELINE = f"{_P}.pipeline.inference_pipeline"
_POINTMAP = f"{_P}.pipeline.inference_pipeline_pointmap"
_MODULES = f"{_P}.model.backbone.tdfy_dit.modules"
_SPARSE = f"{_MODULES}.sparse"
_VAE = f"{_P}.model.backbone.tdfy_dit.models.structured_latent_vae"
_GENERATOR = f"{_P}.model.backbone.generator"
_CFG = f"{_GENERATOR}.classifier_free_guidance"
_DINO = f"{_P}.model.backbone.dit.embedder.dino"
_GAUSSIAN = f"{_P}.model.backbone.tdfy_dit.representations.gaussian.gaussian_model"
_ATTENTION = f"{_SPARSE}.attention"


@dataclass(frozen=True)
class Name:
    """An upstream module, or a dotted attribute of one (``Class.method``). ``own``: the
    last attribute defined on its owner itself (``cls.__dict__``), not inherited."""

    module: str
    attribute: str = ""
    own: bool = False

    def __str__(self) -> str:
        name = f"{self.module}:{self.attribute}" if self.attribute else self.module
        return f"{name} (its own)" if self.own else name


def _names(module: str, *attributes: str) -> tuple[Name, ...]:
    return tuple(Name(module, a) for a in attributes) if attributes else (Name(module),)


# What each path needs; instance attributes (``pipeline.models[...]``) are in check_pipeline.
SURFACE: dict[str, tuple[Name, ...]] = {
    "default": (
        *_names(f"{_MODULES}.attention"),
        *_names(_SPARSE),
        *_names(_DINO, "Dino"),
        *_names(
            _POINTMAP,
            "InferencePipelinePointMap",
            "InferencePipelinePointMap.run",
        ),
        *_names(_GAUSSIAN, "Gaussian.get_xyz", "Gaussian.get_rotation", "Gaussian.get_scaling"),
        *_names(_GAUSSIAN, "Gaussian.get_opacity"),
    ),
    # flow.generate_outputs: all objects of an image through the stages in batches
    "batched_flow": (
        *_names(_PIPELINE, "prune_sparse_structure", "downsample_sparse_structure"),
        *_names(
            _POINTMAP,
            "InferencePipelinePointMap.sample_sparse_structure",
            "InferencePipelinePointMap.sample_slat",
            "InferencePipelinePointMap.decode_slat",
            "InferencePipelinePointMap.postprocess_slat_output",
            "InferencePipelinePointMap.compute_pointmap",
            "InferencePipelinePointMap._down_sample_img",
        ),
        *_names(
            f"{_P}.model.backbone.generator.flow_matching.model", "FlowMatching._generate_noise"
        ),
        *_names(
            f"{_P}.data.dataset.tdfy.preprocessor",
            "PreProcessor._process_image_mask_pointmap_mess",
            "PreProcessor.pointmap_transform",
        ),
        *_names(_SPARSE, "SparseTensor"),
    ),
    # decoders.mesh_trunk: the mesh decoder's trunk over a part, its tails per object
    "mesh_trunks": (
        *_names(
            f"{_VAE}.decoder_mesh", "SLatMeshDecoder.forward", "SLatMeshDecoder.to_representation"
        ),
        *_names(f"{_VAE}.base", "SparseTransformerBase.forward"),
    ),
    # guidance.cfg_pairs: a guided step's two halves in one backbone call
    "cfg_pairs": _names(
        _CFG, "ClassifierFreeGuidance.inner_forward", "ClassifierFreeGuidance._cfg_step"
    ),
    # image_rows.shared_image_rows: DINO once for the photo every object of a part shares
    "shared_image_rows": _names(_DINO, "Dino.forward"),
    # sparse.gathered_broadcasts: per-object broadcasts in sparse ops as one gather
    "gathered_broadcasts": _names(f"{_SPARSE}.basic", "sparse_batch_broadcast"),
    # sparse.row_group_norms: sparse group norms as column reductions
    "row_group_norms": tuple(  # each class's own forward is replaced, then restored
        Name(f"{_SPARSE}.norm", f"{cls}.forward", own=True)
        for cls in ("SparseGroupNorm", "SparseGroupNorm32")
    ),
    # flow.step_exits: a check before every flow step, so rows can leave a cross-job batch
    "step_exits": _names(
        f"{_P}.model.backbone.generator.flow_matching.model", "FlowMatching._generate_dynamics"
    ),
    # attention.install_into_upstream: varlen attention (SAM3D_ATTN_BACKEND varlen)
    "varlen_attention": (
        *_names(f"{_ATTENTION}.full_attn", "ATTN"),
        *_names(f"{_ATTENTION}.windowed_attn", "ATTN"),
        *_names(f"{_ATTENTION}.serialized_attn", "ATTN"),
        *_names(f"{_ATTENTION}.modules", "sparse_scaled_dot_product_attention"),
    ),
    # flow_compile: stage 1's flow blocks under torch.compile (SAM3D_COMPILE_FLOW)
    "compile_flow": _names(
        f"{_MODULES}.transformer.modulated", "MOTModulatedTransformerCrossBlock.forward"
    ),
}
FAST_PATHS = tuple(name for name in SURFACE if name != "default")


class UpstreamSurfaceError(Sam3dError):
    """Upstream lacks what the default path needs: the worker cannot run the model."""

    def __init__(self, missing: Iterable[Name]) -> None:
        names = ", ".join(map(str, missing))
        super().__init__(
            ErrorCode.PREFLIGHT_FAILED,
            f"cannot start the sam3d backend: the installed SAM 3D Objects lacks {names}; "
            "install the version in requirements/gpu.txt",
        )


@dataclass(frozen=True)
class FastPath:
    """One fast path as the worker runs it: engaged or not, and why."""

    name: str
    engaged: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "engaged": self.engaged, "reason": self.reason}


def resolves(name: Name) -> bool:
    """Whether upstream has ``name`` (its module imported, then each attribute looked up)."""
    try:
        obj: Any = importlib.import_module(name.module)
    except Exception:  # noqa: BLE001 - an upstream module that fails to import is missing
        return False
    for part in filter(None, name.attribute.split(".")):
        if not hasattr(obj, part):
            return False
        owner, obj = obj, getattr(obj, part)
    return not name.own or part in vars(owner)


def check_names(
    switches: Mapping[str, tuple[bool, str]],
    resolve: Callable[[Name], bool] = resolves,
) -> dict[str, FastPath]:
    """Every fast path's state from the names upstream has. ``switches``: per fast path,
    (on by the settings, the reason when off). Raises ``UpstreamSurfaceError`` when the
    default path lacks a name."""
    missing_default = [n for n in SURFACE["default"] if not resolve(n)]
    if missing_default:
        raise UpstreamSurfaceError(missing_default)
    paths: dict[str, FastPath] = {}
    for path in FAST_PATHS:
        on, off_reason = switches.get(path, (True, ""))
        if not on:
            paths[path] = FastPath(path, False, off_reason)
            continue
        missing = [str(n) for n in SURFACE[path] if not resolve(n)]
        if missing:
            reason = f"upstream lacks {', '.join(missing)}"
            log.warning("sam3d fast path %s is off: %s", path, reason)
            paths[path] = FastPath(path, False, reason)
        else:
            paths[path] = FastPath(path, True, "on")
    return paths


def check_pipeline(pipeline: Any, paths: dict[str, FastPath]) -> dict[str, FastPath]:
    """The engaged fast paths checked against the built pipeline's parts (the classes they
    replace parts of); one whose parts are not upstream's own is turned off, with a WARNING."""
    from worker.backends.sam3d import decoders, image_rows

    models = dict(getattr(pipeline, "models", None) or {})
    checks: dict[str, Callable[[], str | None]] = {
        "cfg_pairs": lambda: _guidance_reason(models),
        "mesh_trunks": lambda: (
            None
            if decoders.mesh_trunk(pipeline, ["mesh"]) is not None
            else "the mesh decoder is not upstream's SLatMeshDecoder"
        ),
        "shared_image_rows": lambda: (
            None
            if image_rows.dino_encoders(pipeline)
            else "no DINO image encoder in the condition embedders"
        ),
        "compile_flow": lambda: (
            None if _stage1_blocks(pipeline) else "stage 1's flow has no blocks to compile"
        ),
    }
    out = dict(paths)
    for path, check in checks.items():
        if not out.get(path, FastPath(path, False, "")).engaged:
            continue
        try:
            reason = check()
        except Exception as exc:  # noqa: BLE001 - a part reached otherwise than upstream's
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            log.warning("sam3d fast path %s is off: %s", path, reason)
            out[path] = FastPath(path, False, reason)
    return out


def _guidance_reason(models: Mapping[str, Any]) -> str | None:
    from worker.backends.sam3d.guidance import pairable

    for name in ("ss_generator", "slat_generator"):
        cfg = getattr(models.get(name), "reverse_fn", None)
        if cfg is None or not pairable(cfg):
            return f"{name}'s guidance is not upstream's two-call add_flag guidance"
    return None


def _stage1_blocks(pipeline: Any) -> list:
    from worker.backends.sam3d import flow_compile

    return list(flow_compile.stage1_blocks(pipeline))


def log_fast_paths(paths: Mapping[str, FastPath]) -> None:
    for path in paths.values():
        log.info("sam3d fast path %s: %s", path.name, "engaged" if path.engaged else path.reason)
