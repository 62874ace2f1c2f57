"""Benchmark of the job service on the embedded stack. Prints a table; asserts nothing.

    .venv/bin/python bench/service.py [--jobs N] [--seconds S]

1. Overhead: submit -> succeeded as the client sees it (polling every 2 ms), minus the
   worker's own generate+export time from the manifest. Tiny jobs, one at a time.
2. Status GETs per second and their p99, from 8 client threads on keep-alive connections.
3. Submits per second with a ~100 KB JPEG (no worker running, so only the API is measured).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from sam3d_client.http import Http

from sam3d_jobs.devstack import DevStack

SQUARE = [40, 30, 90, 30, 90, 80, 40, 80]
TINY = {"splats": 200, "resolution": 16}


def jpeg_of_size(target: int) -> bytes:
    rng = np.random.default_rng(0)
    side = 160
    while True:
        img = rng.integers(0, 255, (side * 3 // 4, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85)
        if buf.tell() >= target:
            return buf.getvalue()
        side += 16


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def bench_overhead(stack: DevStack, jobs: int) -> tuple[list[float], list[float]]:
    api = Http(stack.url)
    image = base64.b64encode(jpeg_of_size(8_000)).decode()
    client_side, server_side = [], []
    for _ in range(jobs):
        body = {"image": {"type": "base64", "value": image}, "mask_input": SQUARE, "options": TINY}
        t0 = time.perf_counter()
        job_id = api.json("POST", "/v1/jobs", body)["id"]
        while True:
            job = api.json("GET", f"/v1/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed"):
                break
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        work = job["result"]["timings"]["total_s"]
        client_side.append((elapsed - work) * 1000)
        created = datetime.fromisoformat(job["created_at"]).timestamp()
        finished = datetime.fromisoformat(job["finished_at"]).timestamp()
        server_side.append((finished - created - work) * 1000)
    return client_side, server_side


def bench_gets(stack: DevStack, seconds: float, threads: int = 8) -> tuple[float, list[float]]:
    api = Http(stack.url)
    job_id = api.json(
        "POST",
        "/v1/jobs",
        {
            "image": {"type": "base64", "value": base64.b64encode(jpeg_of_size(8_000)).decode()},
            "mask_input": SQUARE,
            "options": TINY,
        },
    )["id"]
    api.wait(job_id)
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
        mine = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            conn.request("GET", f"/v1/jobs/{job_id}")
            resp = conn.getresponse()
            resp.read()
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(latencies) / (time.perf_counter() - t0), latencies


def bench_submits(stack: DevStack, seconds: float, threads: int = 4) -> tuple[float, int]:
    for proc in list(stack.workers):
        stack.stop_worker(proc)
    image = jpeg_of_size(100_000)
    body = json.dumps(
        {
            "image": {"type": "base64", "value": base64.b64encode(image).decode()},
            "mask_input": SQUARE,
            "options": TINY,
        }
    ).encode()
    count = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        nonlocal count
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        done = 0
        while time.perf_counter() < stop:
            conn.request("POST", "/v1/jobs", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 202, resp.status
            done += 1
        with lock:
            count += done

    workers = [threading.Thread(target=client) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return count / (time.perf_counter() - t0), len(image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--api-workers", type=int, default=2)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        DevStack(Path(tmp), api_workers=args.api_workers) as stack,
    ):
        client_ms, server_ms = bench_overhead(stack, args.jobs)
        rate, latencies = bench_gets(stack, args.seconds)
        submits, image_bytes = bench_submits(stack, args.seconds)

    print(f"{'benchmark':<52} {'value':>12} {'target':>12}")
    print("-" * 78)
    rows = [
        (
            "submit->succeeded overhead, median (client, 2 ms poll)",
            f"{statistics.median(client_ms):.1f} ms",
            "<= 50 ms",
        ),
        ("submit->succeeded overhead, p99 (client)", f"{pct(client_ms, 99):.1f} ms", ""),
        (
            "submit->succeeded overhead, median (server clocks)",
            f"{statistics.median(server_ms):.1f} ms",
            "",
        ),
        ("status GETs per second (8 threads)", f"{rate:.0f} /s", ">= 500 /s"),
        ("status GET latency p50", f"{pct(latencies, 50):.1f} ms", ""),
        ("status GET latency p99", f"{pct(latencies, 99):.1f} ms", "<= 50 ms"),
        (f"submits per second ({image_bytes // 1000} KB JPEG, 4 threads)", f"{submits:.1f} /s", ""),
    ]
    for name, value, target in rows:
        print(f"{name:<52} {value:>12} {target:>12}")
    print(
        f"({args.jobs} overhead jobs; {len(latencies)} GETs; "
        f"API: gunicorn, {args.api_workers} processes x 8 threads)"
    )


if __name__ == "__main__":
    main()
