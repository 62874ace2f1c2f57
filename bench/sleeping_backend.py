"""A stand-in for SAM 3D on the CPU: each object "generates" by sleeping (the GPU busy) and
returns SAM 3D-sized outputs (640k splats, a ~1M-face mesh), made once at setup. Every
generate call's start and end (unix seconds) is appended to $SAM3D_BENCH_LOG, one JSON line
each, so the benchmark can tell how busy the "GPU" was. Loaded by the worker as
``sleeping_backend:SleepingSam3d`` with bench/ on PYTHONPATH.

With ``SAM3D_BENCH_HOLD_GIL=1`` an object's generation is pure Python instead of a sleep: as
many loop turns as take ``SAM3D_BENCH_SLEEP_S`` alone (measured at setup). It holds the GIL
as a thread launching GPU kernels does, so export threads that take the GIL stretch it, as
they stretched SAM 3D's model work on the H100 (2026-12-07): a generation's time over
``SAM3D_BENCH_SLEEP_S`` is that stretch."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from jobs.frames import Camera, pose_from_matrix
from worker.backends.base import Gaussians, Mesh, ObjectResult

SLEEP_S = float(os.environ.get("SAM3D_BENCH_SLEEP_S", "10"))
HOLD_GIL = os.environ.get("SAM3D_BENCH_HOLD_GIL") == "1"
SPLATS = int(os.environ.get("SAM3D_BENCH_SPLATS", "640000"))
# vertices 500k, faces ~1M by default; SAM3D_BENCH_GRID_ROWS=50 gives a 100k-face mesh
GRID = (int(os.environ.get("SAM3D_BENCH_GRID_ROWS", "500")), 1000)


def _mesh() -> Mesh:
    rows, cols = GRID
    u, v = np.meshgrid(np.linspace(-0.5, 0.5, cols), np.linspace(-0.5, 0.5, rows))
    vertices = np.stack([u, 0.2 * np.sin(6 * u) * np.cos(6 * v), v], -1).reshape(-1, 3)
    idx = np.arange(rows * cols).reshape(rows, cols)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    faces = np.concatenate([np.stack([a, c, b], -1), np.stack([b, c, d], -1)]).reshape(-1, 3)
    colors = np.full((len(vertices), 4), 200, dtype=np.uint8)
    return Mesh(vertices.astype(np.float32), faces.astype(np.int32), colors)


def _gaussians() -> Gaussians:
    rng = np.random.default_rng(0)
    rotations = rng.normal(size=(SPLATS, 4)).astype(np.float32)
    rotations /= np.linalg.norm(rotations, axis=1, keepdims=True)
    return Gaussians(
        positions=rng.uniform(-0.5, 0.5, (SPLATS, 3)).astype(np.float32),
        rotations=rotations,
        scales=rng.uniform(0.001, 0.01, (SPLATS, 3)).astype(np.float32),
        opacities=rng.uniform(0.1, 0.9, SPLATS).astype(np.float32),
        colors=rng.uniform(0, 1, (SPLATS, 3)).astype(np.float32),
    )


def _spin(turns: int) -> None:
    count = 0
    for _ in range(turns // 1000):
        for _ in range(1000):
            count += 1


def _turns_per_second(seconds: float = 0.5) -> float:
    """Loop turns of ``_spin`` per second, alone (at setup: nothing is exported yet)."""
    turns, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _spin(100_000)
        turns += 100_000
    return turns / (time.perf_counter() - t0)


class SleepingSam3d:
    name = "sleeping-sam3d"
    version = "bench"

    def setup(self) -> None:
        self.mesh, self.gaussians = _mesh(), _gaussians()
        shift = np.eye(4)
        shift[2, 3] = -3.0
        self.pose = pose_from_matrix(shift)
        self.log = os.environ.get("SAM3D_BENCH_LOG")
        self.turns = round(_turns_per_second() * SLEEP_S) if HOLD_GIL else 0

    def camera(self, image, options) -> Camera:
        height, width = image.shape[:2]
        return Camera.from_fov(width, height, 60.0)

    def generate(self, image, mask, *, camera, seed, options) -> ObjectResult:
        start = time.time()
        if HOLD_GIL:
            _spin(self.turns)
        else:
            time.sleep(SLEEP_S)
        end = time.time()
        if self.log:
            with open(self.log, "a") as out:
                out.write(json.dumps({"start": start, "end": end}) + "\n")
        return ObjectResult(self.mesh, self.gaussians, self.pose)
