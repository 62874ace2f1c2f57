"""A bounded schemathesis run against the live API (gunicorn, a Celery worker, a private Redis),
driven by the API's own /openapi.json: every operation, generated valid and invalid requests,
stateful sequences through its links. No answer is a 5xx, none is undocumented as to content
type, and a method a route lacks answers 405 with ``Allow``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from service import make_stack

MAX_TIME_S = 45  # the whole run; fuzzing and stateful phases repeat until it is spent
SEED = 13  # reproducible: a failure here replays with the same seed
CHECKS = "not_a_server_error,content_type_conformance,unsupported_method,allow_header_conformance"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("schemathesis"), workers=1)
    s.start()
    yield s
    s.stop()


@pytest.mark.slow
def test_a_schemathesis_run_finds_no_server_error(stack, tmp_path):
    report, har = tmp_path / "report.json", tmp_path / "requests.har"
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run", f"{stack.url}/openapi.json",
        "--checks", CHECKS,
        "--max-time", str(MAX_TIME_S),
        "--max-examples", "10",
        "--seed", str(SEED),
        "--request-timeout", "30",
        "--report", "json,har",
        "--report-json-path", str(report),
        "--report-har-path", str(har),
    ]  # fmt: skip
    # In tmp_path: schemathesis keeps a cache of past crashes (replayed first) in its cwd.
    run = subprocess.run(
        command, capture_output=True, text=True, timeout=MAX_TIME_S + 120, cwd=tmp_path
    )
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(report.read_text())
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    by_status = dict(sorted(statuses.items()))
    print(f"\nschemathesis {summary['schemathesis_version']}, seed {SEED}, {MAX_TIME_S} s: "
          f"{summary['test_cases']['generated']} test cases, {len(entries)} requests over "
          f"{summary['operations']['tested']} operations; statuses {by_status}")  # fmt: skip
    assert summary["failures"] == [] and summary["errors"] == [], run.stdout[-6000:]
    assert run.returncode == 0, run.stdout[-6000:]
    assert summary["operations"]["tested"] == summary["operations"]["total"]
    assert not [s for s in statuses if s >= 500]
    assert len(entries) >= 200  # a real run, not one that stopped at the schema
    log = (stack.log_dir / "api.log").read_text()
    assert "unhandled error" not in log and "Traceback" not in log
