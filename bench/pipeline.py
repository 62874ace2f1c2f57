"""Benchmark of the pipelined worker on the embedded stack. Prints a table; asserts nothing.

    .venv/bin/python bench/pipeline.py [--sleep S] [--jobs N] [--skip-busy] [--skip-large]
        [--hold-gil] [--options JSON]

1. GPU busy fraction with a full queue: a stand-in backend that sleeps ``--sleep`` seconds
   per object (default 10, as SAM 3D at its default steps) and returns SAM 3D-sized
   outputs (640k splats and a ~1M-face mesh per object), on a 12 MP photo; ``--jobs`` jobs
   of 1 object, then of 8 objects, submitted at once. Busy = time inside generate / time
   from the first generate's start to the last one's end. ``--hold-gil``: the stand-in
   generates in pure Python instead of sleeping, and each generation's time over its time
   alone (the stretch the export threads cause) is printed too.
2. Time from an object's end of generation to its appearance in ``GET /v1/jobs/{id}``
   (polling every 10 ms), over the objects of one 8-object job.
3. Submit of a 40 MP photo with 64 polygon masks (inflate): the request's wall time, and the
   peak RSS (VmHWM) of the API worker process and the worker's pool process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sam3d_client.http import Http  # noqa: E402

from jobs.settings import Settings  # noqa: E402
from sam3d_jobs.devstack import DevStack  # noqa: E402


def photo(width: int, height: int) -> bytes:
    """A smooth JPEG with some texture (small file, real decode cost)."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    rgb = np.stack([xx * 255 / width, yy * 255 / height, 128 + 60 * np.sin(xx / 37)], -1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def polygons(width: int, height: int, count: int, points: int = 64) -> list[list[float]]:
    """``count`` star-ish polygons spread over the image."""
    rng = np.random.default_rng(1)
    out = []
    cols = int(np.ceil(np.sqrt(count)))
    cell_w, cell_h = width / cols, height / cols
    for k in range(count):
        cx, cy = (k % cols + 0.5) * cell_w, (k // cols + 0.5) * cell_h
        angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
        radius = 0.4 * min(cell_w, cell_h) * rng.uniform(0.6, 1.0, points)
        xy = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
        out.append([round(float(v), 1) for v in xy.reshape(-1)])
    return out


def submit(http: Http, image: bytes, masks, options: dict) -> str:
    fields = {"mask_input": json.dumps(masks), "options": json.dumps(options)}
    return http.post_multipart("/v1/jobs", fields, [("image", "photo.jpg", image)])["id"]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; no psutil)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stack_for(data: Path, backend: str, env: dict[str, str]) -> DevStack:
    return DevStack(
        data,
        backend=backend,
        workers=1,
        api_workers=1,
        settings=Settings(max_job_output_bytes=0),
        extra_env={"PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)]), **env},
    )


def busy_fraction(log: Path) -> tuple[float, int]:
    spans = [json.loads(line) for line in log.read_text().splitlines()]
    busy = sum(s["end"] - s["start"] for s in spans)
    return busy / (spans[-1]["end"] - spans[0]["start"]), len(spans)


def stretch(log: Path, sleep_s: float) -> tuple[float, float]:
    """(median, max) of each generation's time over its time alone (``--hold-gil``)."""
    spans = [json.loads(line) for line in log.read_text().splitlines()]
    ratios = [(s["end"] - s["start"]) / sleep_s for s in spans]
    return statistics.median(ratios), max(ratios)


def bench_busy(
    tmp: Path, sleep_s: float, jobs: int, hold_gil: bool = False, options: dict | None = None
) -> list[tuple[str, str]]:
    rows = []
    image = photo(4000, 3000)  # 12 MP
    for objects in (1, 8):
        log = tmp / f"busy-{objects}.jsonl"
        env = {"SAM3D_BENCH_SLEEP_S": str(sleep_s), "SAM3D_BENCH_LOG": str(log)}
        if hold_gil:
            env["SAM3D_BENCH_HOLD_GIL"] = "1"
        with stack_for(tmp / f"busy-{objects}", "sleeping_backend:SleepingSam3d", env) as stack:
            http = Http(stack.url)
            masks = polygons(4000, 3000, objects)
            ids = [submit(http, image, masks, options or {}) for _ in range(jobs)]
            for job_id in ids:
                job = http.wait(job_id, timeout=jobs * objects * (sleep_s + 30) + 120)
                assert job["status"] == "succeeded", job["error"]
            fraction, spans = busy_fraction(log)
        what = f"{jobs} jobs x {objects} object(s), 12 MP, {sleep_s:g} s/object"
        rows.append((f"GPU busy, {what}", f"{fraction:.3f} ({spans} generations)"))
        if hold_gil:
            median, worst = stretch(log, sleep_s)
            rows.append(
                (
                    f"generation stretch (GIL held), {what}",
                    f"median {median:.2f}x, max {worst:.2f}x",
                )
            )
    return rows


def bench_visible(tmp: Path, sleep_s: float) -> list[tuple[str, str]]:
    log = tmp / "visible.jsonl"
    env = {"SAM3D_BENCH_SLEEP_S": str(sleep_s), "SAM3D_BENCH_LOG": str(log)}
    seen: dict[int, float] = {}
    with stack_for(tmp / "visible", "sleeping_backend:SleepingSam3d", env) as stack:
        http = Http(stack.url)
        job_id = submit(http, photo(4000, 3000), polygons(4000, 3000, 8), {})
        while True:
            view = http.json("GET", f"/v1/jobs/{job_id}")
            now = time.time()
            for obj in view.get("objects") or []:
                if obj["state"] == "done" and obj["index"] not in seen:
                    seen[obj["index"]] = now
            if view["status"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.01)
    ends = [json.loads(line)["end"] for line in log.read_text().splitlines()]
    delays = [seen[i] - end for i, end in enumerate(ends)]
    return [
        (
            "end of generation -> visible in GET (8 SAM 3D-sized objects)",
            f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s",
        )
    ]


def bench_large(tmp: Path) -> list[tuple[str, str]]:
    width, height = 7296, 5472  # 39.9 MP
    image = photo(width, height)
    masks = polygons(width, height, 64)
    with stack_for(tmp / "large", "inflate", {}) as stack:
        http = Http(stack.url)
        t0 = time.perf_counter()
        job_id = submit(http, image, masks, {"splats": 2000})
        submit_s = time.perf_counter() - t0
        job = http.wait(job_id, timeout=1200)
        api = [stack.api.pid, *descendants(stack.api.pid)]
        workers = descendants(stack.workers[0].pid)
        api_mb = max(peak_rss_mb(p) for p in api)
        worker_mb = max(peak_rss_mb(p) for p in workers)
        status = job["status"]
    return [
        (f"submit 40 MP JPEG ({len(image) / 1e6:.1f} MB) + 64 polygon masks", f"{submit_s:.2f} s"),
        ("API peak RSS (largest process)", f"{api_mb:.0f} MB"),
        (f"worker peak RSS (pool process), job {status}", f"{worker_mb:.0f} MB"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sleep", type=float, default=10.0, help="seconds per object")
    parser.add_argument("--jobs", type=int, default=4, help="jobs per busy-fraction run")
    parser.add_argument("--skip-busy", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument(
        "--hold-gil",
        action="store_true",
        help="the stand-in generates in pure Python (holding the GIL, as PyTorch launching "
        "kernels does): prints how much the export threads stretch each generation",
    )
    parser.add_argument("--options", default="{}", help="job options as JSON")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="sam3d-bench-") as tmp:
        if not args.skip_busy:
            options = json.loads(args.options)
            rows += bench_busy(Path(tmp), args.sleep, args.jobs, args.hold_gil, options)
            rows += bench_visible(Path(tmp), min(args.sleep, 2.0))
        if not args.skip_large:
            rows += bench_large(Path(tmp))
    if not rows:
        print("nothing measured: --skip-busy and --skip-large leave no part")
        return
    width = max(len(name) for name, _ in rows)
    print(f"{'measure'.ljust(width)}  value")
    print(f"{'-' * width}  -----")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    # Not asserted: the goals are busy >= 0.97, visible within 1 s, submit <= 3 s, API peak
    # <= 600 MB, worker peak <= 1.5 GB.


if __name__ == "__main__":
    main()
