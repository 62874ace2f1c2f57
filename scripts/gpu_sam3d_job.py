"""On a GPU machine: the real model in the real service, one job end to end.

    python scripts/gpu_sam3d_job.py --checkpoint DIR [--out DIR]

Starts a private Redis, the API (gunicorn) and one Celery worker with ``--backend sam3d --gpu 0``
(the checkpoint may hold random weights: scripts/sam3d_random_checkpoint.py), submits the
sample photo with its three masks over HTTP, waits for ``succeeded``, downloads every artifact
by its signed URL and reads each back (GLB through trimesh, PLY through plyfile). Prints the
job, the manifest's per-object numbers and the worker heartbeat; exit 0 only if all held.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_client.http import Http, artifact_urls  # noqa: E402

from jobs.settings import Settings  # noqa: E402
from sam3d_jobs.devstack import DevStack  # noqa: E402

SAMPLE_IMAGE = ROOT / "samples" / "shapes.jpg"
SAMPLE_MASKS = ROOT / "samples" / "shapes.coco.json"


def read_back(path: Path) -> dict:
    """An independent read of one artifact: what it holds."""
    if path.suffix == ".glb":
        import trimesh

        scene = trimesh.load(path, force="scene")
        textures = [
            g.visual.material.baseColorTexture.size
            for g in scene.geometry.values()
            if getattr(g.visual, "uv", None) is not None
            and getattr(g.visual.material, "baseColorTexture", None) is not None
        ]
        return {
            "meshes": len(scene.geometry),
            "faces": sum(len(g.faces) for g in scene.geometry.values()),
            **({"textures": textures} if textures else {}),
        }
    if path.suffix == ".ply":
        from plyfile import PlyData

        return {"splats": PlyData.read(str(path))["vertex"].count}
    return {"keys": sorted(json.loads(path.read_text()))}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu-job")))
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--options", default="{}", help='job options as JSON: {"texture": 1024}')
    parser.add_argument(
        "--keep",
        default="",
        help="artifacts copied into --out (comma-separated paths, '/' becomes '_'), for readers "
        "that run elsewhere (the Khronos validator, Blender)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        settings = Settings.from_env(checkpoint_dir=str(Path(args.checkpoint).resolve()))
        stack = DevStack(tmp / "stack", workers=0, settings=settings, api_workers=1,
                         log_dir=args.out / "logs")  # fmt: skip
        stack.start(wait=False)
        try:
            t0 = time.perf_counter()
            stack.start_worker(backend="sam3d", gpu=0)
            ready = stack.wait_ready(args.timeout)
            report["worker_ready_s"] = round(time.perf_counter() - t0, 1)
            report["heartbeat"] = ready["checks"]["workers"]["details"]
            http = Http(stack.url)
            t0 = time.perf_counter()
            job = http.post_multipart(
                "/v1/jobs",
                {"mask_input": SAMPLE_MASKS.read_text(), "options": args.options},
                [("image", SAMPLE_IMAGE.name, SAMPLE_IMAGE.read_bytes())],
            )
            job = http.wait(job["id"], timeout=args.timeout)
            report["job_status"] = job["status"]
            report["job_error"] = job.get("error")
            report["submit_to_succeeded_s"] = round(time.perf_counter() - t0, 2)
            if job["status"] == "succeeded":
                files = {}
                for path, url in artifact_urls(job["result"]).items():
                    size = http.download(url, tmp / "result" / path)
                    files[path] = {"bytes": size, **read_back(tmp / "result" / path)}
                    if path in args.keep.split(","):
                        shutil.copy(tmp / "result" / path, args.out / path.replace("/", "_"))
                report["artifacts"] = files
                manifest = json.loads((tmp / "result" / "manifest.json").read_text())
                report["manifest"] = {
                    "backend": manifest["backend"],
                    "camera": manifest["camera"],
                    "timings": manifest["timings"],
                    "objects": [
                        {
                            k: o[k]
                            for k in (
                                "index",
                                "num_vertices",
                                "num_faces",
                                "num_splats",
                                "time_s",
                                "texture",
                                "metadata",
                            )
                            if k in o
                        }
                        for o in manifest["objects"]
                    ],
                }
        finally:
            stack.stop()
    (args.out / "gpu_sam3d_job.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2)[:6000])
    ok = report.get("job_status") == "succeeded" and len(report.get("artifacts", {})) == 9
    if json.loads(args.options).get("texture"):  # every mesh GLB read back with its texture
        files = report.get("artifacts", {}).items()
        meshes = [f for p, f in files if p.endswith(".glb") and not p.endswith(".splats.glb")]
        ok = ok and all(len(f.get("textures", [])) == f["meshes"] for f in meshes)
        # baked from the Gaussians, their nearest found on the card
        objects = report.get("manifest", {}).get("objects", [])
        route = "gaussians, nearest by grid on cuda"  # not the k-d tree it falls back to
        ok = ok and all(o.get("texture", {}).get("from", "").startswith(route) for o in objects)
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
