"""N GPUs on one host: one resident worker per GPU, objects per second for 1 and N GPUs.

    python bench/gpus.py --gpus 0,1 [--backend sam3d] [--jobs 12] [--kill]
    python bench/gpus.py --gpus 0,1 --backend sleeping_backend:SleepingSam3d --sleep 1  # CPU

For each worker count n (1, then every GPU listed), the dev stack runs one Redis, the API
and n workers, worker i started with ``--gpu i`` (it sees only that card: CUDA_VISIBLE_DEVICES
is set before its pool forks; its Celery name is ``gpu{i}@host``). A queue of mixed jobs (1
to 8 objects each, the sample photo with its masks and then ellipses) is submitted at once
and drained. Printed per n: objects per second, seconds to drain, how the jobs spread over
the workers, each worker's busy fraction (its heartbeat says ``busy`` while it holds a job,
sampled every 0.25 s), each GPU's sampled utilisation (NVML, where there is one).
``--kill``: with n > 1, the last worker is SIGKILLed once the first jobs finish; every job
must still end ``succeeded`` exactly once (the reaper or the visibility timeout brings its
job back) while the other workers go on.

The sam3d backend needs SAM3D_CHECKPOINT_DIR (random weights will do:
scripts/sam3d_random_checkpoint.py). The sleeping stand-in (bench/sleeping_backend.py) shows
the service side on any machine: no GPU is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_client.http import Http  # noqa: E402

from jobs.settings import Settings  # noqa: E402
from sam3d_jobs.devstack import DevStack  # noqa: E402

SAMPLE_IMAGE = ROOT / "samples" / "shapes.jpg"
SAMPLE_MASKS = json.loads((ROOT / "samples" / "shapes.coco.json").read_text())
OBJECT_MIX = (1, 4, 8, 2, 6, 3, 8, 1, 5, 2, 7, 4)


def job_polygons(count: int, width: int = 640, height: int = 480) -> list[list[float]]:
    """``count`` polygons: the sample's own first, then ellipses on a grid."""
    polygons = [
        seg
        for ann in SAMPLE_MASKS["annotations"]
        if isinstance(ann["segmentation"], list)  # the ball is RLE
        for seg in ann["segmentation"]
    ]
    polygons = polygons[:count]
    cells = int(np.ceil(np.sqrt(max(count - len(polygons), 1))))
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    k = 0
    while len(polygons) < count:
        cy, cx = (k // cells + 0.5) * height / cells, (k % cells + 0.5) * width / cells
        ry, rx = 0.35 * height / cells, 0.25 * width / cells
        ring = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1)
        polygons.append([round(float(v), 1) for v in ring.reshape(-1)])
        k += 1
    return polygons


class Sampler(threading.Thread):
    """Every 0.25 s: which worker holds which job (heartbeats) and each GPU's utilisation."""

    def __init__(self, http: Http, gpus: list[int]) -> None:
        super().__init__(daemon=True)
        self.http, self.gpus = http, gpus
        self.stop = threading.Event()
        self.busy: Counter = Counter()
        self.samples: Counter = Counter()
        self.job_worker: dict[str, str] = {}
        self.util: dict[int, list[float]] = {g: [] for g in gpus}
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception:  # no NVIDIA driver here: the service side only
            self.nvml = None

    def run(self) -> None:
        while not self.stop.is_set():
            for heart in _hearts(self.http):
                name = heart.get("name", "?")
                self.samples[name] += 1
                if heart.get("state") == "busy":
                    self.busy[name] += 1
                if heart.get("current_job"):
                    self.job_worker.setdefault(heart["current_job"], name)
            if self.nvml is not None:
                for g in self.gpus:
                    handle = self.nvml.nvmlDeviceGetHandleByIndex(g)
                    self.util[g].append(self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            self.stop.wait(0.25)


def run_fleet(tmp: Path, gpus: list[int], args) -> dict:
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    if args.sleep is not None:
        env["SAM3D_BENCH_SLEEP_S"] = str(args.sleep)
        env["SAM3D_BENCH_SPLATS"] = str(args.splats)
        env["SAM3D_BENCH_GRID_ROWS"] = "20"  # a 40k-face mesh: the service side, not export
    settings = Settings.from_env(max_job_output_bytes=0)
    stack = DevStack(tmp, workers=0, settings=settings, api_workers=1, extra_env=env)
    stack.start(wait=False)
    try:
        workers = [stack.start_worker(backend=args.backend, gpu=g) for g in gpus]
        http = Http(stack.url)
        deadline = time.monotonic() + args.ready_timeout
        while True:
            hearts = _hearts(http)
            if len([h for h in hearts if h.get("state") == "ready"]) >= len(gpus):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(gpus)} workers not ready; see {stack.log_dir}")
            time.sleep(0.5)
        sampler = Sampler(http, gpus)
        sampler.start()
        image = SAMPLE_IMAGE.read_bytes()
        mix = [OBJECT_MIX[i % len(OBJECT_MIX)] for i in range(args.jobs)]
        t0 = time.perf_counter()
        ids = [
            http.post_multipart(
                "/v1/jobs",
                {
                    "mask_input": json.dumps(job_polygons(n)),
                    "mask_format": "polygon",
                    "options": json.dumps({"seed": i}),
                },
                [("image", SAMPLE_IMAGE.name, image)],
            )["id"]
            for i, n in enumerate(mix)
        ]
        killed = False
        if args.kill and len(gpus) > 1:
            http.wait(ids[0], timeout=args.job_timeout)
            stack.kill_worker(workers[-1])
            killed = True
        jobs = [http.wait(job_id, timeout=args.job_timeout) for job_id in ids]
        seconds = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    finally:
        stack.stop()
    statuses = Counter(j["status"] for j in jobs)
    objects = sum(n for n, j in zip(mix, jobs, strict=True) if j["status"] == "succeeded")
    spread = Counter(sampler.job_worker.get(j, "unseen") for j in ids)
    return {
        "gpus": gpus,
        "jobs": len(ids),
        "objects": objects,
        "seconds": seconds,
        "objects_per_s": objects / seconds,
        "statuses": dict(statuses),
        "attempts": Counter(j.get("attempts", 1) for j in jobs),
        "spread": dict(spread),
        "busy": {w: sampler.busy[w] / max(1, sampler.samples[w]) for w in sampler.samples},
        "gpu_util_mean": {g: (sum(v) / len(v) if v else None) for g, v in sampler.util.items()},
        "killed": killed,
    }


def _hearts(http: Http) -> list[dict]:
    """The workers' heartbeats (readiness answers 503 until one is up: then none)."""
    try:
        return http.json("GET", "/readyz")["checks"]["workers"]["details"]
    except Exception:
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", default="0,1", help="GPU indices, one worker each")
    parser.add_argument("--backend", default="sam3d")
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument(
        "--sleep", type=float, default=None, help="the sleeping stand-in's s/object"
    )
    parser.add_argument("--splats", type=int, default=20000, help="the stand-in's splats/object")
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--job-timeout", type=float, default=3600)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gpus = [int(g) for g in args.gpus.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted({1, len(gpus)}):
            row = run_fleet(Path(tmp) / f"fleet-{n}", gpus[:n], args)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    base = rows[0]["objects_per_s"]
    print(f"\n{args.backend}, {args.jobs} jobs of 1-8 objects:\n")
    print(
        "| GPUs | objects/s | vs 1 GPU | seconds | jobs per worker | busy per worker "
        "| GPU util % | statuses |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        busy = ", ".join(f"{w.split('@')[0]} {b:.2f}" for w, b in sorted(r["busy"].items()))
        util = ", ".join("-" if u is None else f"{u:.0f}" for u in r["gpu_util_mean"].values())
        spread = ", ".join(f"{w.split('@')[0]} {c}" for w, c in sorted(r["spread"].items()))
        print(
            f"| {len(r['gpus'])} | {r['objects_per_s']:.3f} | {r['objects_per_s'] / base:.2f}x | "
            f"{r['seconds']:.1f} | {spread} | {busy} | {util} | {r['statuses']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    ok = all(r["statuses"] == {"succeeded": r["jobs"]} for r in rows)
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
