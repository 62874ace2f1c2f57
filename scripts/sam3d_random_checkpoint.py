"""A SAM 3D Objects checkpoint folder with RANDOM weights, for tests and benchmarks only.

    python scripts/sam3d_random_checkpoint.py OUT [--configs DIR] [--voxels N] [--seed S]

Compute does not depend on weight values, so timings, memory and the structure of every
output are those of the real model; the assets themselves are noise. Never serve it.

With upstream importable (see worker/backends/sam3d/upstream.py), this writes OUT in upstream's
own layout, loadable by ``sam3d-jobs worker --backend sam3d`` unchanged:
- the configs of DIR (default ``../shared/sam3d-configs``: the seven YAMLs of the Hugging Face
  repo), with ``pipeline.yaml``'s MoGe entry pointing at ``moge/model.pt`` inside OUT;
- ``ss_generator.ckpt`` / ``slat_generator.ckpt``: ``{"state_dict": ...}`` with the flow under
  ``_base_models.generator.`` and its condition embedder under ``_base_models.condition_embedder.``;
- the decoders' ``*.ckpt``: raw state dicts; ``moge/model.pt``: ``{"model_config", "model"}``.

Upstream's TRELLIS-style init zeroes the adaLN modulation and output layers, which would make
every flow predict zero velocity: every all-zero parameter is re-drawn from N(0, 0.02).

``--voxels N`` sets how many voxels stage 1 yields (after upstream's pruning), as real objects
do (20-27k); random weights give whatever their logits give. It runs stage 1 once on a synthetic
image and mask and shifts the occupancy decoder's output bias so that N voxels come out for
that input (other inputs land near N). Small N gives small outputs (recorded test data).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ROOT.parent / "shared" / "sam3d-configs"
MOGE_FILE = "moge/model.pt"
# MoGe v1 ViT-L, the depth model pipeline.yaml names (0.31 B parameters).
MOGE_CONFIG = {
    "encoder": "dinov2_vitl14",
    "intermediate_layers": 4,
    "dim_proj": 512,
    "dim_upsample": [256, 128, 64],
    "dim_times_res_block_hidden": 2,
    "num_res_blocks": 2,
    "remap_output": "exp",
    "num_tokens_range": [1200, 2500],
    "last_res_blocks": 0,
    "last_conv_channels": 32,
    "last_conv_size": 1,
}
GENERATORS = ("ss_generator", "slat_generator")
DECODERS = ("ss_decoder", "slat_decoder_gs", "slat_decoder_gs_4", "slat_decoder_mesh")
# Where each model sits in its YAML, and the state-dict prefix upstream's loader strips.
GENERATOR_PARTS = (
    ("module.generator.backbone", "_base_models.generator."),
    ("module.condition_embedder.backbone", "_base_models.condition_embedder."),
)
DECODER_PARTS = (("", ""),)  # the whole YAML, a raw state dict


def redraw_zeros(model, std: float = 0.02) -> int:
    """Re-draw every all-zero parameter from N(0, std); returns how many were."""
    import torch

    count = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() and not param.any():
                param.normal_(0.0, std)
                count += 1
    return count


def half_state(model, prefix: str = "") -> dict:
    import torch

    return {
        prefix + k: (v.half() if v.is_floating_point() else v).cpu().contiguous()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }


def write_configs(source: Path, out: Path) -> None:
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    for yaml in sorted(source.glob("*.yaml")):
        shutil.copy(yaml, out / yaml.name)
    pipeline = OmegaConf.load(out / "pipeline.yaml")
    pipeline.depth_model.model.pretrained_model_name_or_path = MOGE_FILE
    OmegaConf.save(pipeline, out / "pipeline.yaml")


def write_weights(out: Path, dinov2_dir: str) -> dict:
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from worker.backends.sam3d import upstream as up

    config = up.pipeline_config(out, dinov2_dir=dinov2_dir)
    report = {}
    for key in GENERATORS + DECODERS:
        t0 = time.perf_counter()
        model_yaml = up.model_config(config, key)
        state: dict = {}
        redrawn = 0
        for path, prefix in GENERATOR_PARTS if key in GENERATORS else DECODER_PARTS:
            node = OmegaConf.select(model_yaml, path) if path else model_yaml
            if not path and "pretrained_ckpt_path" in node:
                del node["pretrained_ckpt_path"]
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                torch.manual_seed(len(state))
                model = instantiate(node)
            redrawn += redraw_zeros(model)
            state.update(half_state(model, prefix))
            del model
        torch.save({"state_dict": state} if key in GENERATORS else state, out / f"{key}.ckpt")
        params = sum(v.numel() for v in state.values())
        report[key] = {"params": params, "redrawn": redrawn, "s": time.perf_counter() - t0}
        print(f"{key}: {params / 1e6:.0f} M parameters, {redrawn} re-drawn", flush=True)

    from moge.model.v1 import MoGeModel

    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        moge = MoGeModel(**MOGE_CONFIG)
    (out / MOGE_FILE).parent.mkdir(exist_ok=True)
    torch.save({"model_config": MOGE_CONFIG, "model": half_state(moge)}, out / MOGE_FILE)
    report["moge"] = {"params": sum(p.numel() for p in moge.parameters())}
    return report


def calibration_input(size: int = 512):
    """A textured image with one round object in it (the input voxels are counted on)."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    image = (rng.random((size, size, 3)) * 64 + 96).astype(np.uint8)
    mask = (yy - size * 0.55) ** 2 + (xx - size * 0.5) ** 2 < (size * 0.25) ** 2
    image[mask] = [200, 80, 60]
    return image, mask


def set_voxels(out: Path | None, target: int, pipeline) -> dict:
    """Shift the occupancy decoder's output bias so stage 1 yields ``target`` voxels."""
    import numpy as np
    import torch
    from sam3d_objects.pipeline.inference_utils import prune_sparse_structure

    decoder = pipeline.models["ss_decoder"]
    last = [m for m in decoder.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    captured = {}
    forward = decoder.forward

    def capture(latent, *a, **k):
        captured["latent"] = latent.detach().clone()
        return forward(latent, *a, **k)

    decoder.forward = capture
    image, mask = calibration_input()
    rgba = np.concatenate([image, mask[..., None].astype(np.uint8) * 255], -1)
    pipeline.run(rgba, None, seed=0, stage1_only=True, with_mesh_postprocess=False,
                 with_texture_baking=False)  # fmt: skip
    decoder.forward = forward
    with torch.no_grad(), torch.autocast("cuda", dtype=pipeline.shape_model_dtype):
        logits = decoder(captured["latent"]).float().flatten()
    ranked = logits.sort(descending=True).values

    def voxels_above(threshold: float) -> int:
        grid = (logits.view(1, 1, 64, 64, 64) > threshold).squeeze(1)
        coords = torch.argwhere(grid)[:, [0, 1, 2, 3]].int()
        if len(coords) == 0:
            return 0
        return len(prune_sparse_structure(coords, max_neighbor_axes_dist=1))

    lo, hi = min(target, len(ranked) - 1), len(ranked) - 1  # pruning only removes voxels
    while lo < hi:
        mid = (lo + hi) // 2
        if voxels_above(float(ranked[mid])) < target:
            lo = mid + 1
        else:
            hi = mid
    threshold = float(ranked[lo])
    with torch.no_grad():
        last.bias -= threshold
    if out is not None:  # else only the pipeline in memory changes
        state = {
            k: v.half() if v.is_floating_point() else v for k, v in decoder.state_dict().items()
        }
        torch.save({k: v.cpu() for k, v in state.items()}, out / "ss_decoder.ckpt")
    got = voxels_above(threshold)
    print(f"ss_decoder bias shifted by {-threshold:.4f}: {got} voxels (target {target})")
    return {"bias_shift": -threshold, "voxels": got}


def main() -> int:
    parser = argparse.ArgumentParser(description="random-weights SAM 3D checkpoint (tests only)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--configs", type=Path, default=DEFAULT_CONFIGS)
    parser.add_argument("--voxels", type=int, default=0, help="stage-1 voxel target (0: as drawn)")
    parser.add_argument(
        "--bias-shift",
        type=float,
        default=None,
        help="apply a shift an earlier --voxels run printed, instead of calibrating again (the "
        "weights are drawn from fixed seeds, so the same torch and GPU give the same ones)",
    )
    parser.add_argument("--attention", default="auto")
    args = parser.parse_args()

    import os

    from worker.backends.sam3d import upstream as up

    up.import_upstream(args.attention)
    dinov2_dir = os.environ.get("SAM3D_DINOV2_DIR", "")
    write_configs(args.configs, args.out)
    t0 = time.perf_counter()
    write_weights(args.out, dinov2_dir)
    print(f"weights written in {time.perf_counter() - t0:.1f} s to {args.out}")
    if args.bias_shift is not None:
        import torch

        state = torch.load(args.out / "ss_decoder.ckpt")
        key = [k for k, v in state.items() if k.endswith(".bias") and v.shape == (1,)][-1]
        state[key] = (state[key].float() + args.bias_shift).half()
        torch.save(state, args.out / "ss_decoder.ckpt")
        print(f"ss_decoder {key} shifted by {args.bias_shift}")
    elif args.voxels:
        pipeline = up.build_pipeline(up.pipeline_config(args.out, dinov2_dir=dinov2_dir))
        set_voxels(args.out, args.voxels, pipeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
