"""Importing and building upstream's SAM 3D Objects pipeline, offline and on any attention.

Upstream (``sam3d_objects``) is an installed dependency: either facebookresearch/sam-3d-objects
itself, or the copy PyPI's ``sam3d`` wheel vendors under ``sam3d/third_party/meta`` (found and
put on ``sys.path`` here). Three things need care, all handled before upstream builds anything:

- **Attention.** Upstream's modules read ``ATTN_BACKEND``/``SPARSE_ATTN_BACKEND`` once at import,
  and importing its pipeline module forces flash-attn on A100/H100/H200. We import the
  attention modules first with the backend chosen here. ``varlen`` (the default where
  flash-attn is not installed) routes the sparse attention through
  ``worker.backends.sam3d.attention`` (PyTorch's varlen kernel) instead of upstream's
  dense-mask SDPA fallback.
- **No downloads at start.** Upstream's DINOv2 embedders call ``torch.hub.load`` from GitHub
  with pretrained weights, which the checkpoint then overwrites. We load them with
  ``pretrained=False`` and, with ``SAM3D_DINOV2_DIR``, from a local hub folder. The MoGe path
  in ``pipeline.yaml`` may be relative to the checkpoint folder (or set ``SAM3D_MOGE_PATH``).
- **Configs stay untouched.** The patched copies of the model YAMLs are written to a private
  folder and named by absolute path (upstream joins them onto ``workspace_dir``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("sam3d.worker")

ATTENTION_CHOICES = ("auto", "varlen", "flash_attn", "xformers", "sdpa")
CONFIG_KEYS = (
    "ss_generator",
    "slat_generator",
    "ss_decoder",
    "slat_decoder_gs",
    "slat_decoder_gs_4",
    "slat_decoder_mesh",
)
DINO_TARGET = "sam3d_objects.model.backbone.dit.embedder.dino.Dino"
_imported: dict[str, Any] = {}


def resolve_attention(requested: str) -> str:
    """``auto`` -> flash_attn where it is installed, else PyTorch's varlen kernel."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"attention backend {requested!r}: choose one of {ATTENTION_CHOICES}")
    if requested == "auto":
        return "flash_attn" if importlib.util.find_spec("flash_attn") else "varlen"
    return requested


def upstream_available() -> bool:
    """Whether ``sam3d_objects`` is importable, directly or from PyPI's ``sam3d`` wheel."""
    return _add_vendored_path() or importlib.util.find_spec("sam3d_objects") is not None


def _add_vendored_path() -> bool:
    if importlib.util.find_spec("sam3d_objects") is not None:
        return True
    spec = importlib.util.find_spec("sam3d")
    if spec is None or not spec.submodule_search_locations:
        return False
    vendored = Path(next(iter(spec.submodule_search_locations))) / "third_party" / "meta"
    if not (vendored / "sam3d_objects").is_dir():
        return False
    sys.path.insert(0, str(vendored))
    importlib.invalidate_caches()
    return True


def import_upstream(attention: str = "auto") -> str:
    """Import upstream with the chosen attention; returns the backend in use. Idempotent."""
    if "attention" in _imported:
        return _imported["attention"]
    chosen = resolve_attention(attention)
    if not _add_vendored_path():
        raise ImportError("sam3d_objects is not installed (nor PyPI's sam3d, which vendors it)")
    os.environ.setdefault("LIDRA_SKIP_INIT", "true")
    at_import = "sdpa" if chosen == "varlen" else chosen
    os.environ["ATTN_BACKEND"] = os.environ["SPARSE_ATTN_BACKEND"] = at_import
    base = "sam3d_objects.model.backbone.tdfy_dit.modules"
    importlib.import_module(f"{base}.attention")
    importlib.import_module(f"{base}.sparse")
    if chosen == "varlen":
        from worker.backends.sam3d import attention, surface

        missing = [str(n) for n in surface.SURFACE["varlen_attention"] if not surface.resolves(n)]
        if missing:  # upstream's own sdpa branch stays (slow, but right); reported at setup
            log.warning("varlen attention not installed: upstream lacks %s", ", ".join(missing))
        else:
            log.info(
                "sparse attention through torch varlen: %s",
                attention.install_into_upstream(),
            )
    # Imports set_attention_backend(), which rewrites the variables on A100/H100/H200; the
    # modules that read them are loaded already, so put ours back for anything that asks.
    importlib.import_module("sam3d_objects.pipeline.inference_pipeline_pointmap")
    os.environ["ATTN_BACKEND"] = os.environ["SPARSE_ATTN_BACKEND"] = at_import
    _imported["attention"] = chosen
    return chosen


def _patch_dino(node: Any, dinov2_dir: str) -> int:
    """Every DINOv2 embedder in a config tree: no pretrained download, local hub if given."""
    from omegaconf import DictConfig, ListConfig

    count = 0
    if isinstance(node, DictConfig):
        if node.get("_target_") == DINO_TARGET:
            given = node.get("backbone_kwargs") or {}
            node["backbone_kwargs"] = {**given, "pretrained": False}
            if dinov2_dir:
                node["repo_or_dir"] = dinov2_dir
                node["source"] = "local"
            count += 1
        for key in list(node.keys()):
            count += _patch_dino(node[key], dinov2_dir)
    elif isinstance(node, ListConfig):
        for item in node:
            count += _patch_dino(item, dinov2_dir)
    return count


def pipeline_config(
    checkpoint_dir: str | Path,
    *,
    dinov2_dir: str = "",
    moge_path: str = "",
    compile_model: bool = False,
    workdir: str | Path | None = None,
):
    """``pipeline.yaml`` of ``checkpoint_dir`` ready to instantiate offline (OmegaConf)."""
    from omegaconf import OmegaConf

    folder = Path(checkpoint_dir).resolve()
    config = OmegaConf.load(folder / "pipeline.yaml")
    out = Path(workdir or tempfile.mkdtemp(prefix="sam3d-configs-"))
    out.mkdir(parents=True, exist_ok=True)
    for key in CONFIG_KEYS:
        name = config.get(f"{key}_config_path")
        if not name or not (folder / name).is_file():
            continue
        model_config = OmegaConf.load(folder / name)
        _patch_dino(model_config, dinov2_dir)
        OmegaConf.save(model_config, out / Path(name).name)
        config[f"{key}_config_path"] = str(out / Path(name).name)  # absolute: join keeps it
    config.workspace_dir = str(folder)
    config.compile_model = compile_model
    config.rendering_engine = "pytorch3d"  # nvdiffrast is non-commercial and unused here
    depth = config.get("depth_model", {}).get("model", {})
    if "pretrained_model_name_or_path" in depth:
        given = moge_path or str(depth["pretrained_model_name_or_path"])
        if not Path(given).is_absolute() and (folder / given).exists():
            given = str(folder / given)
        depth["pretrained_model_name_or_path"] = given
    return config


def model_config(pipeline: Any, key: str):
    """The (patched) YAML of one model named by the pipeline config, loaded."""
    from omegaconf import OmegaConf

    path = Path(pipeline[f"{key}_config_path"])
    return OmegaConf.load(path if path.is_absolute() else Path(pipeline.workspace_dir) / path)


def build_pipeline(config: Any) -> Any:
    """Instantiate upstream's pipeline from ``pipeline_config``'s result (loads every weight)."""
    from hydra.utils import instantiate

    return instantiate(config)
