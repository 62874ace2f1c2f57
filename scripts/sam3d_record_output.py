"""Record one small real upstream output as test data (run on a GPU machine).

    python scripts/sam3d_record_output.py --checkpoint DIR --out tests/data/sam3d_output \
        [--voxels 400]

Runs upstream's ``pipeline.run`` as the ``sam3d`` backend calls it, on a 256x256 synthetic photo
with one round mask, after shifting the occupancy decoder's bias (in memory) so stage 1 yields
about ``--voxels`` voxels: a real output structure a few MB in size. Writes:
- ``arrays.npz``: the Gaussians as upstream's getters give them (``get_xyz``, ``get_rotation``,
  ``get_scaling``, ``get_opacity``, ``_features_dc``), the pose (``rotation`` w,x,y,z,
  ``translation``, ``scale``), the ``pointmap`` upstream returns, the intrinsics upstream infers
  from it (normalised), and the splat centres in the camera frame by upstream's own maths
  (``compose_transform(scale, quaternion_to_matrix(rotation), translation)``, as its
  ``make_scene`` / ``SceneVisualizer.object_pointcloud`` place them);
- ``mesh.glb``: upstream's ``glb`` (trimesh) exported as GLB; ``meta.json``: versions, sizes.
tests/test_sam3d_recorded.py converts these with ``convert_output`` on every CI run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--voxels", type=int, default=400)
    args = parser.parse_args()

    import torch
    from sam3d_random_checkpoint import calibration_input, set_voxels

    from jobs.settings import Settings
    from worker.backends.sam3d import Sam3dBackend, run_kwargs

    backend = Sam3dBackend(Settings.from_env(checkpoint_dir=args.checkpoint))
    backend.setup()  # imports upstream (after which its modules import)
    from pytorch3d.transforms import quaternion_to_matrix
    from sam3d_objects.data.dataset.tdfy.transforms_3d import compose_transform
    from sam3d_objects.pipeline.utils.pointmap import infer_intrinsics_from_pointmap

    pipeline = backend.pipeline
    calibration = set_voxels(None, args.voxels, pipeline)
    image, mask = calibration_input(256)
    t0 = time.perf_counter()
    output = backend._run(image, mask, {"seed": 7})
    run_s = time.perf_counter() - t0

    gs = output["gs"]

    def arr(t):
        return t.detach().float().cpu().numpy()

    xyz = gs.get_xyz
    rotation, translation, scale = output["rotation"], output["translation"], output["scale"]
    transform = compose_transform(
        scale=scale.float(),
        rotation=quaternion_to_matrix(rotation.float()),
        translation=translation.float(),
    )
    scene_xyz = transform.transform_points(xyz.float()[None])[0]
    pointmap = output["pointmap"].float()  # H x W x 3, PyTorch3D camera frame
    moge_frame = pointmap * torch.tensor([-1.0, -1.0, 1.0])  # upstream's inverse convention map
    intrinsics = infer_intrinsics_from_pointmap(
        moge_frame.to(pipeline.device), device=pipeline.device
    )
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / "arrays.npz",
        gs_xyz=arr(xyz),
        gs_rotation=arr(gs.get_rotation),
        gs_scaling=arr(gs.get_scaling),
        gs_opacity=arr(gs.get_opacity),
        gs_features_dc=arr(gs._features_dc),
        rotation=arr(rotation),
        translation=arr(translation),
        scale=arr(scale),
        pointmap=arr(pointmap).astype(np.float32),
        intrinsics=arr(intrinsics["intrinsics"]),
        upstream_scene_xyz=arr(scene_xyz),
        image=image,
        mask=mask,
    )
    output["glb"].export(args.out / "mesh.glb", file_type="glb")
    meta = {
        "recorded": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "upstream": "sam3d_objects vendored by PyPI sam3d 0.1.2 (sam-3d-objects cf06676)",
        "weights": "random (scripts/sam3d_random_checkpoint.py)",
        "run_kwargs": run_kwargs({"seed": 7}),
        "voxels": int(output["coords"].shape[0]),
        "calibration": calibration,
        "splats": int(xyz.shape[0]),
        "mesh_vertices": int(len(output["glb"].vertices)),
        "mesh_faces": int(len(output["glb"].faces)),
        "output_keys": sorted(output),
        "run_s": round(run_s, 3),
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    print(json.dumps(meta, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
