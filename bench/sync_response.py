"""Memory of the API while ``POST /sam3_3d/infer`` streams a large answer. Prints a table.

    .venv/bin/python bench/sync_response.py [--splats N]

One object with N splats (default 1M: a ~68 MB PLY, so ~190 MB of base64 JSON with the scene).
The job is made by a first request; the second, measured, request is answered from the same job
(same body), so only the streaming is measured: the API process's peak RSS over its baseline.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from sam3d_jobs.devstack import DevStack


def _rss_kb(root_pid: int) -> int:
    """Largest VmRSS among the process and its children (gunicorn's worker)."""
    best = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            proc = Path("/proc") / name
            ppid = int((proc / "stat").read_text().split()[3])
            if root_pid not in (ppid, int(name)):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS"):
                    best = max(best, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            continue
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splats", type=int, default=1_000_000)
    args = parser.parse_args()
    image = np.full((120, 160, 3), 120, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    body = json.dumps(
        {
            "image": {"type": "base64", "value": base64.b64encode(buf.getvalue()).decode()},
            "mask_input": [100, 30, 140, 30, 140, 70, 100, 70],
            "options": {"splats": args.splats},
        }
    ).encode()
    with tempfile.TemporaryDirectory() as tmp, DevStack(Path(tmp), api_workers=1) as stack:

        def post():
            request = urllib.request.Request(
                stack.url + "/sam3_3d/infer", body, {"Content-Type": "application/json"}
            )
            return urllib.request.urlopen(request, timeout=600)

        with post() as resp:
            first = json.loads(resp.read())
        baseline = _rss_kb(stack.api.pid)
        peak, done = [baseline], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kb(stack.api.pid))
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.perf_counter()
        size = 0
        with post() as resp:
            while chunk := resp.read(1 << 20):
                size += len(chunk)
        seconds = time.perf_counter() - started
        done.set()
        watcher.join()
    largest = max(len(first["gaussian_ply"]), len(first["objects"][0]["gaussian_ply"])) * 3 // 4
    rows = [
        ("response body", f"{size / 1e6:.1f} MB"),
        ("largest artifact (raw)", f"{largest / 1e6:.1f} MB"),
        ("streamed in", f"{seconds:.2f} s"),
        ("API RSS baseline", f"{baseline / 1024:.0f} MB"),
        ("API RSS peak while streaming", f"{peak[0] / 1024:.0f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
