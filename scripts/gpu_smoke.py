"""On a GPU machine: the worker's GPU facts, preflight, the out-of-memory path and one job
end to end through Redis and the API. Prints a report and writes it as JSON.

    python scripts/gpu_smoke.py [--out DIR]

Needs the project's Python dependencies (celery, redis, flask, trimesh, ...) and a
``redis-server`` on PATH; torch with CUDA for the out-of-memory part. No SAM 3D weights:
the jobs use ``inflate``; the out-of-memory job uses the GpuHog fixture, which holds 2 GiB
on the GPU and then asks for 128 TiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_client.http import Http, artifact_urls  # noqa: E402

from sam3d_jobs.devstack import DevStack  # noqa: E402
from worker.gpu import gpu_status  # noqa: E402

SAMPLE_IMAGE = ROOT / "samples" / "shapes.jpg"
SAMPLE_MASKS = ROOT / "samples" / "shapes.coco.json"
SQUARE = [330, 230, 470, 215, 490, 345, 345, 365]


def worker_hearts(http: Http) -> list[dict]:
    return http.json("GET", "/readyz")["checks"]["workers"]["details"]


def preflight_runs(tmp: Path) -> list[dict]:
    """`sam3d-jobs worker --backend sam3d` without weights, with an incomplete folder, and with
    a complete fake folder but a free-memory floor above this GPU's."""
    fake = tmp / "fake-ckpt"
    fake.mkdir()
    from worker.backends.sam3d import REQUIRED_FILES

    for name in REQUIRED_FILES:
        (fake / name).write_text("not weights")
    partial = tmp / "partial-ckpt"
    partial.mkdir()
    (partial / "pipeline.yaml").write_text("x")
    cases = [
        ("no folder", {"SAM3D_CHECKPOINT_DIR": str(tmp / "missing")}),
        ("incomplete folder", {"SAM3D_CHECKPOINT_DIR": str(partial)}),
        (
            "complete folder, 500 GB asked",
            {"SAM3D_CHECKPOINT_DIR": str(fake), "SAM3D_MIN_FREE_GPU_GB": "500"},
        ),
    ]
    runs = []
    for name, env in cases:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "sam3d_jobs.cli", "worker", "--backend", "sam3d", "--gpu", "0"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        runs.append(
            {
                "case": name,
                "exit_code": proc.returncode,
                "seconds": round(time.perf_counter() - t0, 2),
                "stderr": proc.stderr.strip(),
            }
        )
    return runs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/gpu-smoke")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu_nvml": gpu_status(0)}
    try:
        import torch

        report["torch"] = {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }
    except ImportError:
        report["torch"] = None

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        report["preflight"] = preflight_runs(tmp)
        env = {
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
        }
        stack = DevStack(tmp / "stack", workers=0, extra_env=env, api_workers=1)
        stack.start(wait=False)
        try:
            stack.start_worker(backend="inflate", queues="interactive", gpu=0)
            stack.wait_ready(120)
            http = Http(stack.url)
            report["heartbeat_inflate_worker"] = worker_hearts(http)

            # Out of memory on the GPU: the job fails retryable; the same worker goes on.
            hog = stack.start_worker(backend="fixture_backends:GpuHog", queues="bulk", gpu=0)
            deadline = time.monotonic() + 120
            while len([w for w in worker_hearts(http) if w.get("state") == "ready"]) < 2:
                assert time.monotonic() < deadline, "GpuHog worker never became ready"
                time.sleep(0.2)
            image = {"type": "base64", "value": _b64(SAMPLE_IMAGE)}
            body = {"image": image, "mask_input": [SQUARE], "options": {"priority": "bulk"}}
            before = gpu_status(0)
            oom = http.wait(http.json("POST", "/v1/jobs", body)["id"], timeout=120)
            time.sleep(0.5)
            hog_heart = [w for w in worker_hearts(http) if w["backend"] == "gpu-hog"][0]
            after_oom = gpu_status(0)
            after = http.wait(http.json("POST", "/v1/jobs", body)["id"], timeout=120)
            report["oom"] = {
                "job_status": oom["status"],
                "error": oom["error"],
                "worker_alive_after": hog.poll() is None,
                "next_job_on_same_worker": after["status"],
                "heartbeat_after_oom": hog_heart,
                "gpu_used_mb_before_job": before and before["memory_used_mb"],
                "gpu_used_mb_after_failed_job": after_oom and after_oom["memory_used_mb"],
            }

            # One job end to end: the sample, 3 objects, every artifact downloaded.
            t0 = time.perf_counter()
            job = http.post_multipart(
                "/v1/jobs",
                {"mask_input": SAMPLE_MASKS.read_text()},
                [("image", SAMPLE_IMAGE.name, SAMPLE_IMAGE.read_bytes())],
            )
            job = http.wait(job["id"], timeout=300)
            downloaded = {}
            if job["status"] == "succeeded":
                for path, url in artifact_urls(job["result"]).items():
                    downloaded[path] = http.download(url, tmp / "result" / path)
            report["end_to_end"] = {
                "status": job["status"],
                "seconds_submit_to_downloaded": round(time.perf_counter() - t0, 3),
                "worker_time_s": (job.get("result") or {}).get("time"),
                "objects": job["progress"],
                "artifact_bytes": downloaded,
                "error": job["error"],
            }
            metrics = _get(stack.url + "/metrics")
            report["metrics_excerpt"] = [
                line
                for line in metrics.splitlines()
                if line.startswith(("sam3d_jobs", "sam3d_workers"))
            ]
        finally:
            stack.stop()

    (args.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    _print(report)
    ok = (
        report["oom"]["error"] and report["oom"]["error"]["code"] == "out_of_memory"
        and report["oom"]["next_job_on_same_worker"] == "succeeded"
        and report["end_to_end"]["status"] == "succeeded"
        and all(r["exit_code"] == 3 for r in report["preflight"])
    )  # fmt: skip
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def _b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url) as resp:
        return resp.read().decode()


def _print(report: dict) -> None:
    print("GPU (NVML):", report["gpu_nvml"])
    print("torch:", report["torch"])
    for run in report["preflight"]:
        print(f"preflight [{run['case']}] exit={run['exit_code']} ({run['seconds']} s)")
        print("   " + run["stderr"].replace("\n", "\n   "))
    for heart in report["heartbeat_inflate_worker"]:
        print("heartbeat:", json.dumps(heart))
    print("OOM:", json.dumps(report["oom"]))
    print("end to end:", json.dumps(report["end_to_end"]))
    print("metrics:", *report["metrics_excerpt"], sep="\n  ")


if __name__ == "__main__":
    sys.exit(main())
