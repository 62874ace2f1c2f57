"""Where a profiled job's wall time goes: a torch.profiler Chrome trace read back as a timeline.

    python bench/trace.py TRACE.json[.gz] [--bin-ms 100]

bench/gpu.py ``--profile N --trace FILE`` writes the trace. Printed:

- per label (``record_function`` ranges, e.g. bench/gpu.py's ``stage:*``): calls, the host
  seconds inside it, and the GPU kernel seconds it launched (kernels are matched to their
  launch through the profiler's correlation ids, so work on other threads' streams counts
  where it was launched);
- the GPU's idle time inside the job, split by the labels open on the host meanwhile (which
  host work the GPU was waiting for);
- a timeline in bins: the GPU's busy share and the labels open on each thread.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class Labels:
    """Each thread's ``record_function`` ranges, to ask which are open at a time."""

    def __init__(self, events: list[dict]) -> None:
        self.by_tid: dict[object, list[tuple[float, float, str]]] = defaultdict(list)
        for e in events:
            if e.get("cat") == "user_annotation" and e.get("ph") == "X":
                start = float(e["ts"])
                self.by_tid[e["tid"]].append((start, start + float(e.get("dur", 0)), e["name"]))
        for spans in self.by_tid.values():
            spans.sort()
        self.starts = {tid: [s for s, _, _ in spans] for tid, spans in self.by_tid.items()}

    def innermost(self, tid, ts: float) -> str:
        """The innermost label open on ``tid`` at ``ts`` (ranges on one thread nest)."""
        spans = self.by_tid.get(tid, [])
        i = bisect.bisect_right(self.starts.get(tid, []), ts)
        while i > 0:
            i -= 1
            start, end, name = spans[i]
            if ts < end:
                return name
        return "(no label)"

    def everywhere(self, ts: float) -> str:
        """Innermost open label of every thread that has one: 'a | b'."""
        found = sorted({self.innermost(tid, ts) for tid in self.by_tid} - {"(no label)"})
        return " | ".join(found) or "(no label)"


def analyse(events: list[dict], bin_ms: float = 100.0) -> dict:
    labels = Labels(events)
    gpu = [e for e in events if e.get("cat") in GPU_CATS and e.get("ph") == "X"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in gpu]
    busy = _union(spans)
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"]
    start = min([s for s, _ in busy] + [float(e["ts"]) for e in host])
    end = max([b for _, b in busy] + [float(e["ts"]) + float(e.get("dur", 0)) for e in host])

    per_label: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for spans_of in labels.by_tid.values():
        for s, e, name in spans_of:
            per_label[name]["calls"] += 1
            per_label[name]["host_s"] += (e - s) / 1e6
    for e in gpu:
        launch = launches.get(e.get("args", {}).get("correlation"))
        name = "(no launch)" if launch is None else labels.innermost(launch["tid"], launch["ts"])
        per_label[name]["gpu_s"] += float(e.get("dur", 0)) / 1e6

    # Each gap is cut where any label opens or closes; each piece goes to the labels then open.
    edges = sorted(
        {t for spans_of in labels.by_tid.values() for s, e, _ in spans_of for t in (s, e)}
    )
    idle: dict[str, float] = defaultdict(float)
    previous = start
    for s, e in busy + [(end, end)]:
        if s > previous:
            cuts = edges[bisect.bisect_right(edges, previous) : bisect.bisect_left(edges, s)]
            for a, b in zip([previous, *cuts], [*cuts, s], strict=True):
                idle[labels.everywhere(a)] += (b - a) / 1e6
        previous = max(previous, e)

    width = bin_ms * 1e3
    bins = []
    t = start
    j = 0
    while t < end:
        upper = t + width
        covered = 0.0
        while j < len(busy) and busy[j][1] <= t:
            j += 1
        k = j
        while k < len(busy) and busy[k][0] < upper:
            covered += min(busy[k][1], upper) - max(busy[k][0], t)
            k += 1
        opened = labels.everywhere(t)
        bins.append({"t_s": (t - start) / 1e6, "busy": covered / width, "open": opened})
        t = upper
    return {
        "wall_s": (end - start) / 1e6,
        "gpu_busy_s": sum(b - a for a, b in busy) / 1e6,
        "labels": {k: dict(v) for k, v in per_label.items()},
        "idle_by_open_labels": dict(idle),
        "bins": bins,
    }


def report(result: dict, top: int = 25) -> str:
    lines = [
        f"wall {result['wall_s']:.3f} s, GPU busy {result['gpu_busy_s']:.3f} s "
        f"({100 * result['gpu_busy_s'] / max(result['wall_s'], 1e-9):.0f} %)",
        "",
        "| label | calls | host s | GPU kernel s launched |",
        "|---|---|---|---|",
    ]
    rows = sorted(result["labels"].items(), key=lambda kv: -kv[1].get("gpu_s", 0))
    for name, v in rows[:top]:
        lines.append(
            f"| {name} | {int(v.get('calls', 0))} | {v.get('host_s', 0):.3f} | "
            f"{v.get('gpu_s', 0):.3f} |"
        )
    lines += ["", "| GPU idle while open (innermost label per thread) | idle s |", "|---|---|"]
    for name, seconds in sorted(result["idle_by_open_labels"].items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name} | {seconds:.3f} |")
    lines += ["", "| t s | GPU busy | open |", "|---|---|---|"]
    for b in result["bins"]:
        lines.append(f"| {b['t_s']:.2f} | {100 * b['busy']:.0f} % | {b['open']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--bin-ms", type=float, default=100.0)
    args = parser.parse_args()
    print(report(analyse(load(args.trace), args.bin_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
