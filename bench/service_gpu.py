"""The service on one GPU, as a user sees it: jobs submitted over HTTP at once to the dev stack
with a ``sam3d`` worker, objects per second through the service beside the backend's own
batched rate and upstream's per-mask loop on the same weights, in one run. Prints a table.

    python bench/service_gpu.py --checkpoint DIR [--scenarios a,b,c,d] [--json OUT]
    python bench/service_gpu.py --backend sleeping_backend:SleepingSam3d --sleep 0.5  # CPU

Scenarios (jobs submitted at once, each job the sample's masks then ellipses):

- a: 16 one-object fast jobs      - b: 16 one-object default jobs
- c: 8 three-object fast jobs     - d: 4 eight-object default jobs

Per scenario: first one such job alone (its latency at an empty queue); then objects/s
through HTTP (first submit to last job ended), the GPU's busy fraction (NVML utilisation
sampled every 50 ms while the jobs ran, where pynvml or nvidia-smi is there), the jobs'
``generate_s`` summed over the wall time (above 1 where jobs shared batched passes), export
seconds per object (the manifests' ``export_s``, summed over the export threads) and the
median seconds from submit to the job's end. Then, with the stack stopped and the GPU free,
the same jobs in this process: the backend's ``generate_many`` (ours) and ``run()`` once per
mask (upstream's loop), as ``bench/gpu.py
--compare`` runs them. With ``--backend`` a stand-in (CPU), only the HTTP side is measured.
"latency/goal": the worst job's latency over 1.5x its alone latency plus the jobs ahead of it
(at most 1 meets the goal). ``--cancel``: an 8-object default job canceled mid-flow while a
one-object job waits; seconds to the cancel's end and to the next job's start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "sdk"))  # the SDK, where it is not installed (a GPU host's bundle)

from sam3d_client.http import Http  # noqa: E402

from jobs.images import decode_image  # noqa: E402
from jobs.masks import decode_masks, encode_masks_rle  # noqa: E402
from jobs.settings import Settings  # noqa: E402
from sam3d_jobs.devstack import DevStack  # noqa: E402

SCENARIOS = {  # name: (jobs, objects per job, mode)
    "a": (16, 1, "fast"),
    "b": (16, 1, "default"),
    "c": (8, 3, "fast"),
    "d": (4, 8, "default"),
}
MODES = {"default": {}, "fast": {"fast": True}}
TERMINAL = ("succeeded", "failed", "canceled")


def scenario_masks(image: np.ndarray, base: np.ndarray, count: int) -> np.ndarray:
    from gpu import job_masks  # bench/gpu.py: the sample's masks, then ellipses

    return job_masks(image, base, count)


class GpuSampler:
    """Mean NVML utilisation between ``start`` and ``stop`` (None without a GPU reader)."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no pynvml, or no GPU: try nvidia-smi
            pass
        if shutil.which("nvidia-smi"):

            def smi() -> float:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5, check=True,
                )  # fmt: skip
                return float(out.stdout.split()[0])

            return smi
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001 - a sample lost
                continue

    def start(self) -> GpuSampler:
        if self._read is not None:
            self._thread.start()
        return self

    def stop(self) -> float | None:
        self._stop.set()
        if self._read is None:
            return None
        self._thread.join()
        return statistics.fmean(self.samples) / 100 if self.samples else None


def submit(http: Http, image_bytes: bytes, masks: np.ndarray, options: dict) -> str:
    fields = {"mask_input": json.dumps(encode_masks_rle(masks)), "options": json.dumps(options)}
    return http.post_multipart("/v1/jobs", fields, [("image", "image.jpg", image_bytes)])["id"]


def wait_view(http: Http, job_id: str, until, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = http.json("GET", f"/v1/jobs/{job_id}")
        if until(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.02)


def alone_latency(stack: DevStack, image_bytes: bytes, masks: np.ndarray, options: dict) -> float:
    """Seconds from submit to end of one such job at an empty queue."""
    http = Http(stack.url)
    t0 = time.perf_counter()
    job_id = submit(http, image_bytes, masks, options)
    wait_view(http, job_id, lambda v: v["status"] in TERMINAL)
    return time.perf_counter() - t0


def stamp(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def cancel_to_next(
    stack: DevStack, image_bytes: bytes, masks: np.ndarray, options: dict, after_s: float = 2.0
) -> dict:
    """A job of ``masks`` canceled mid-generation while a one-object job waits: seconds from
    the cancel to the canceled job's end and to the waiting job's start (the GPU's next work),
    from the records' times (the API and the worker share this host's clock)."""
    http = Http(stack.url)
    big = submit(http, image_bytes, masks, options)
    wait_view(http, big, lambda v: v["stage"] == "generating" or v["status"] in TERMINAL)
    time.sleep(after_s)  # well into its flows
    small = submit(http, image_bytes, masks[:1], options)
    time.sleep(0.2)
    t_cancel = time.time()
    http.json("POST", f"/v1/jobs/{big}/cancel")
    ended = wait_view(http, big, lambda v: v["status"] in TERMINAL)
    started = wait_view(http, small, lambda v: v["started_at"] is not None)
    wait_view(http, small, lambda v: v["status"] in TERMINAL)
    end, start = stamp(ended["finished_at"]), stamp(started["started_at"])
    return {
        "objects": len(masks),
        "status": ended["status"],
        "objects_done": ended["progress"]["objects_done"],
        "cancel_to_canceled_s": end - t_cancel if end else None,
        "cancel_to_next_job_s": start - t_cancel if start else None,
    }


def through_http(
    stack: DevStack,
    image_bytes: bytes,
    masks: np.ndarray,
    jobs: int,
    options: dict,
    alone_s: float | None = None,
) -> dict:
    """Submit ``jobs`` jobs of ``masks`` at once; wait for all; what the service gave. With
    ``alone_s`` (one such job's latency at an empty queue), each job's latency against the
    goal: at most 1.5x alone plus the work queued before it (``i`` jobs ahead, alone each)."""
    http = Http(stack.url)
    rles = encode_masks_rle(masks)
    fields = {"mask_input": json.dumps(rles), "options": json.dumps(options)}
    sampler = GpuSampler().start()
    t0 = time.perf_counter()
    submitted = {}
    for _ in range(jobs):
        job = http.post_multipart("/v1/jobs", fields, [("image", "image.jpg", image_bytes)])
        submitted[job["id"]] = time.perf_counter()
    ended: dict[str, float] = {}
    views: dict[str, dict] = {}
    while len(ended) < jobs:
        for job_id in [j for j in submitted if j not in ended]:
            view = http.json("GET", f"/v1/jobs/{job_id}")
            if view["status"] in TERMINAL:
                ended[job_id] = time.perf_counter()
                views[job_id] = view
        time.sleep(0.02)
    wall = max(ended.values()) - t0
    busy = sampler.stop()
    failed = [v["error"] for v in views.values() if v["status"] != "succeeded"]
    generate_s = export_s = 0.0
    for job_id, view in views.items():
        if view["status"] != "succeeded":
            continue
        manifest = json.loads(
            (stack.data_dir / "storage" / "jobs" / job_id / "manifest.json").read_text()
        )
        generate_s += manifest["timings"]["generate_s"]
        export_s += manifest["timings"]["export_s"]
    objects = jobs * len(masks)
    latencies = [ended[j] - submitted[j] for j in submitted]  # in submit order
    worst = None
    if alone_s:
        worst = max(lat / (1.5 * alone_s + i * alone_s) for i, lat in enumerate(latencies))
    return {
        "alone_latency_s": alone_s,
        "latency_max_s": max(latencies),
        "latency_vs_goal_max": worst,
        "jobs": jobs,
        "objects": objects,
        "failed": failed,
        "wall_s": wall,
        "http_obj_per_s": objects / wall,
        "gpu_busy": busy,
        "in_generation": generate_s / wall,
        "export_s_per_object": export_s / objects,
        "latency_median_s": statistics.median(ended[j] - submitted[j] for j in submitted),
    }


def in_process(checkpoint: str, image: np.ndarray, plan: dict[str, np.ndarray], reps: int):
    """The backend's own batched rate and upstream's loop, per scenario's job, same weights."""
    import torch
    from gpu import run_way

    from worker.backends.sam3d import Sam3dBackend

    backend = Sam3dBackend(Settings.from_env(checkpoint_dir=checkpoint))
    backend.setup()
    rows: dict[str, dict] = {}
    for name, masks in plan.items():
        mode = SCENARIOS[name][2]
        row = {}
        for way in ("upstream", "ours"):
            run_way(backend, way, image, masks, {"seed": 0, **MODES[mode]})  # cold
            seconds = []
            for seed in range(1, reps + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run_way(backend, way, image, masks, {"seed": seed, **MODES[mode]})
                torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
            row[f"{way}_obj_per_s"] = len(masks) / statistics.median(seconds)
        rows[name] = row
        print(f"in process {name}: {row}", flush=True)
    return rows


def print_table(http_rows: dict[str, dict], own: dict[str, dict]) -> None:
    head = (
        "scenario", "obj/s HTTP", "obj/s ours", "obj/s upstream", "HTTP/ours", "HTTP/upstream",
        "GPU busy", "in generation", "export s/obj", "latency p50 s", "latency/goal",
    )  # fmt: skip
    print("  ".join(f"{h:>14}" for h in head))

    def fmt(value, spec=".2f") -> str:
        return "n/a" if value is None else format(value, spec)

    for name, row in http_rows.items():
        jobs, count, mode = SCENARIOS[name]
        ours = own.get(name, {}).get("ours_obj_per_s")
        upstream = own.get(name, {}).get("upstream_obj_per_s")
        cells = (
            f"{name}: {jobs}x{count} {mode}",
            fmt(row["http_obj_per_s"], ".3f"),
            fmt(ours, ".3f"),
            fmt(upstream, ".3f"),
            fmt(row["http_obj_per_s"] / ours if ours else None),
            fmt(row["http_obj_per_s"] / upstream if upstream else None),
            fmt(row["gpu_busy"]),
            fmt(row["in_generation"]),
            fmt(row["export_s_per_object"], ".3f"),
            fmt(row["latency_median_s"]),
            fmt(row["latency_vs_goal_max"]),
        )
        print("  ".join(f"{c:>14}" for c in cells))
        if row["failed"]:
            print(f"    {len(row['failed'])} job(s) failed: {row['failed'][:2]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="SAM 3D's folder (random weights will do)")
    parser.add_argument("--backend", default="sam3d", help="or a stand-in, module:Class")
    parser.add_argument("--sleep", type=float, default=0.5, help="the stand-in's s/object")
    parser.add_argument("--scenarios", default="a,b,c,d")
    parser.add_argument("--image", type=Path, default=ROOT / "samples" / "shapes.jpg")
    parser.add_argument("--masks", type=Path, default=ROOT / "samples" / "shapes.coco.json")
    parser.add_argument("--reps", type=int, default=2, help="in-process runs per way")
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument(
        "--cancel", action="store_true", help="also: cancel an 8-object default job mid-flow"
    )
    parser.add_argument("--cancel-after", type=float, default=2.0, help="s into its generation")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, help="keep the stack's logs here")
    args = parser.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    if unknown := set(names) - set(SCENARIOS):
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {sorted(SCENARIOS)}")
    if args.backend == "sam3d" and not args.checkpoint:
        parser.error("--checkpoint is needed for the sam3d backend")
    image_bytes = args.image.read_bytes()
    image = decode_image(image_bytes)
    base = decode_masks(json.loads(args.masks.read_text()), image.shape[:2])
    plan = {name: scenario_masks(image, base, SCENARIOS[name][1]) for name in names}

    # The stack's processes keep the inherited path (the GPU bundle's site is on PYTHONPATH).
    paths = [str(ROOT / "bench"), str(ROOT), str(ROOT / "sdk"), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env["SAM3D_BENCH_SLEEP_S"] = str(args.sleep)
    settings = Settings.from_env(max_job_output_bytes=0, checkpoint_dir=args.checkpoint or "")
    # A stand-in's API validates inflate's options: it gets no "fast" (its speed is --sleep).
    modes = MODES if args.backend == "sam3d" else {mode: {} for mode in MODES}
    http_rows: dict[str, dict] = {}
    backends: dict = {}
    cancel: dict = {}
    cancel_masks = scenario_masks(image, base, 8)
    with tempfile.TemporaryDirectory(prefix="sam3d-service-gpu-") as tmp:
        stack = DevStack(
            Path(tmp), backend=args.backend, workers=1, api_workers=2, settings=settings,
            extra_env=env, log_dir=args.logs,
        )  # fmt: skip
        try:
            stack.start(timeout=1800)  # ready once the model has loaded and warmed up
            backends = Http(stack.url).json("GET", "/v1/backends")
            print(f"GET /v1/backends: {json.dumps(backends)}", flush=True)
            for name in names:
                jobs, _, mode = SCENARIOS[name]
                alone = alone_latency(stack, image_bytes, plan[name], modes[mode])
                http_rows[name] = through_http(
                    stack, image_bytes, plan[name], jobs, modes[mode], alone
                )
                print(f"through HTTP {name}: {json.dumps(http_rows[name])}", flush=True)
            if args.cancel:
                cancel = cancel_to_next(
                    stack, image_bytes, cancel_masks, modes["default"], args.cancel_after
                )
                print(f"cancel: {json.dumps(cancel)}", flush=True)
        finally:
            stack.stop()
    own: dict[str, dict] = {}
    if args.backend == "sam3d" and not args.no_in_process:
        own = in_process(args.checkpoint, image, plan, args.reps)
    print()
    print_table(http_rows, own)
    if cancel:
        print(f"cancel of {cancel['objects']} default objects mid-flow: canceled after "
              f"{cancel['cancel_to_canceled_s']:.2f} s, the next job started after "
              f"{cancel['cancel_to_next_job_s']:.2f} s")  # fmt: skip
    if args.json:
        result = {"http": http_rows, "in_process": own, "backends": backends, "cancel": cancel}
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
