"""bench/trace.py reads a torch.profiler Chrome trace back as a timeline.

The host side is a real trace: torch.profiler on the CPU, with ``record_function`` labels,
written by ``export_chrome_trace`` and read back from disk (gzipped, as bench/gpu.py writes
it). The CPU has no kernels, so the GPU side is added by hand in the profiler's own event
shapes: a launch (``cuda_runtime``) on the labelled thread and its kernel, matched by the
correlation id, as CUPTI records them on a GPU host.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest

torch = pytest.importorskip("torch")

from bench import trace  # noqa: E402


def _profiled(tmp_path):
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with (
        torch.profiler.profile(activities=cpu) as prof,
        torch.profiler.record_function("stage:outer"),
    ):
        time.sleep(0.002)
        with torch.profiler.record_function("inner"):
            time.sleep(0.002)
        time.sleep(0.002)
    raw = tmp_path / "trace.json"
    prof.export_chrome_trace(str(raw))
    return json.loads(raw.read_text())


def _gpu(events, name, start, dur, correlation):
    events.append(
        {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": dur, "pid": 0, "tid": 7,
         "args": {"correlation": correlation}}
    )  # fmt: skip


def _launch(events, at, tid, correlation):
    events.append(
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": at, "dur": 1,
         "pid": 1, "tid": tid, "args": {"correlation": correlation}}
    )  # fmt: skip


def test_kernels_count_where_they_were_launched_and_idle_where_the_host_was(tmp_path):
    doc = _profiled(tmp_path)
    events = doc["traceEvents"]
    spans = {e["name"]: e for e in events if e.get("cat") == "user_annotation"}
    outer, inner = spans["stage:outer"], spans["inner"]
    tid, o0, i0 = outer["tid"], float(outer["ts"]), float(inner["ts"])
    # Launched inside "inner": 1 ms of kernel, running after "inner" has closed.
    _launch(events, i0 + 10, tid, 1)
    _gpu(events, "k_inner", i0 + float(inner["dur"]) + 100, 1000, 1)
    # Launched in "outer" only, before "inner" opened: 0.5 ms, running at once.
    _launch(events, o0 + 5, tid, 2)
    _gpu(events, "k_outer", o0 + 10, 500, 2)
    # Launched from a thread with no labels (another thread's stream): 0.25 ms.
    _launch(events, o0 + 20, tid + 1, 3)
    _gpu(events, "k_other", o0 + 600, 250, 3)
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(doc, f)

    result = trace.analyse(trace.load(path), bin_ms=1.0)

    labels = result["labels"]
    assert labels["inner"]["gpu_s"] == pytest.approx(1000e-6)
    assert labels["stage:outer"]["gpu_s"] == pytest.approx(500e-6)
    assert labels["(no label)"]["gpu_s"] == pytest.approx(250e-6)
    assert labels["inner"]["calls"] == 1
    assert labels["inner"]["host_s"] == pytest.approx(float(inner["dur"]) / 1e6)
    assert result["gpu_busy_s"] == pytest.approx(1750e-6)  # the three kernels never overlap
    # The job runs from the first label open to the last label or kernel done; what is not
    # busy is idle, and the idle time is charged to the labels open when each gap began.
    end = max(i0 + float(inner["dur"]) + 1100, o0 + float(outer["dur"]))
    assert result["wall_s"] == pytest.approx((end - o0) / 1e6)
    idle = result["idle_by_open_labels"]
    assert sum(idle.values()) == pytest.approx(result["wall_s"] - result["gpu_busy_s"])
    assert idle["stage:outer"] > 0 and idle.get("inner", 0) > 0
    # Bins: the busy share of each millisecond, first bin the one with k_outer and k_other.
    first = result["bins"][0]
    assert first["busy"] == pytest.approx((500 + 250) / 1000)
    assert first["open"] == "stage:outer"
    report = trace.report(result)
    assert "| inner | 1 |" in report and "GPU busy" in report


def test_nested_labels_report_the_innermost():
    labels = trace.Labels(
        [
            {"ph": "X", "cat": "user_annotation", "name": "a", "ts": 0, "dur": 100, "tid": 1},
            {"ph": "X", "cat": "user_annotation", "name": "b", "ts": 10, "dur": 20, "tid": 1},
            {"ph": "X", "cat": "user_annotation", "name": "c", "ts": 40, "dur": 10, "tid": 1},
            {"ph": "X", "cat": "user_annotation", "name": "d", "ts": 5, "dur": 50, "tid": 2},
        ]
    )
    assert [labels.innermost(1, t) for t in (5, 15, 35, 45, 99, 100)] == [
        "a", "b", "a", "c", "a", "(no label)"
    ]  # fmt: skip
    assert labels.everywhere(15) == "b | d"
    assert labels.everywhere(200) == "(no label)"
