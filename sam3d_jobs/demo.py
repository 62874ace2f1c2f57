"""``make demo``: the embedded stack, the sample submitted over HTTP, every artifact fetched."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sam3d_client.http import Http, artifact_urls

from sam3d_jobs.devstack import DevStack

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGE = ROOT / "samples" / "shapes.jpg"
SAMPLE_MASKS = ROOT / "samples" / "shapes.coco.json"


def run_demo(out: Path, data_dir: Path | None = None) -> int:
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="sam3d-demo-") as tmp:
        print("starting the embedded stack (Redis, API, one inflate worker)...", flush=True)
        with DevStack(Path(data_dir or tmp), api_workers=1) as stack:
            print(f"stack ready at {stack.url}", flush=True)
            http = Http(stack.url)
            t0 = time.perf_counter()
            accepted = http.post_multipart(
                "/v1/jobs",
                {"mask_input": SAMPLE_MASKS.read_text()},
                [("image", SAMPLE_IMAGE.name, SAMPLE_IMAGE.read_bytes())],
            )
            print(
                f"submitted {accepted['id']} ({SAMPLE_IMAGE.name}, 3 masks); polling...", flush=True
            )
            job = http.wait(accepted["id"], timeout=300)
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {job['error']}")
                return 1
            elapsed = time.perf_counter() - t0
            print(f"{job['status']} in {elapsed:.1f} s; downloading by signed URL:", flush=True)
            for path, url in artifact_urls(job["result"]).items():
                size = http.download(url, out / path)
                print(f"  {out / path}  ({size:,} bytes)")
    print(f"open {out / 'scene.glb'} in any glTF viewer, {out / 'scene.ply'} in a splat viewer")
    return 0
