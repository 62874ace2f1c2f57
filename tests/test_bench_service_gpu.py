"""bench/service_gpu.py runs end to end on the CPU with its stand-in backend (the real model's
weights cannot run here): the dev stack, jobs over HTTP, manifests read back, the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_service_benchmark_runs_with_the_stand_in_and_reports_every_job(tmp_path):
    out = tmp_path / "report.json"
    env = {**os.environ, "SAM3D_BENCH_GRID_ROWS": "20", "SAM3D_BENCH_SPLATS": "2000"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "service_gpu.py"),
         "--backend", "sleeping_backend:SleepingSam3d", "--sleep", "0.2",
         "--scenarios", "c", "--cancel", "--cancel-after", "0.2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(out.read_text())
    row = report["http"]["c"]
    assert row["jobs"] == 8 and row["objects"] == 24 and row["failed"] == []
    assert 0 < row["in_generation"] <= 1 and row["http_obj_per_s"] > 0
    assert report["in_process"] == {}  # a stand-in: no in-process comparison
    assert "c: 8x3 fast" in run.stdout
    assert row["alone_latency_s"] > 0 and row["latency_vs_goal_max"] > 0
    cancel = report["cancel"]
    assert cancel["status"] == "canceled" and cancel["objects_done"] < cancel["objects"]
    assert cancel["cancel_to_next_job_s"] >= 0 and cancel["cancel_to_canceled_s"] >= 0
