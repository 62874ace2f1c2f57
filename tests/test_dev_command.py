"""``sam3d-jobs dev``: one command starts the stack; SIGTERM or Ctrl-C stops all of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs.redis_server import free_port

CLI = str(Path(sys.executable).parent / "sam3d-jobs")


def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line or environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_dev_stack_starts_serves_and_stops_without_leftovers(tmp_path, sig):
    port = free_port()
    data = tmp_path / f"data-{sig.name}"
    proc = subprocess.Popen(
        [CLI, "dev", "--port", str(port), "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "SAM3D_API_KEYS": "dev-key"},  # SAM3D_* settings are honoured
    )
    try:
        line = proc.stdout.readline()
        assert f"ready at http://127.0.0.1:{port}" in line, line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as keyless:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/jobs")
        assert keyless.value.code == 401
        marker = str(data)  # in Redis's --dir and in every child's SAM3D_STORAGE_URL
        assert len(processes_mentioning(marker)) >= 4  # redis, api master+worker, celery x2
        proc.send_signal(sig)
        t0 = time.monotonic()
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t0 < 15
        deadline = time.monotonic() + 5
        while processes_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(marker) == []
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (data / "redis" / "appendonlydir").exists() or any((data / "redis").glob("*.aof*"))
