"""Batching across jobs (worker/batching.py) keeps every job's own guarantees: a real
redis-server, real Celery worker processes, the API over HTTP. The backend is a hand-written
stand-in for SAM 3D's cross-job batching (``fixture_backends.CrossJobInflate``: shared passes
of sleeping "flow steps" that ask ``leaving()`` at each, then the real ``inflate`` per object),
since SAM 3D's weights cannot run here; the sam3d backend's own ``generate_batch`` is tested
on the CPU in tests/test_sam3d_batch_flow.py and on the GPU by bench/service_gpu.py."""

from __future__ import annotations

import json
import time

import pytest
from service import SQUARE_FLAT, TRIANGLE_FLAT, make_stack, submit_json, wait_until

BACKEND = "fixture_backends:CrossJobInflate"
TERMINAL = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(
        tmp_path_factory.mktemp("batching"),
        batch_jobs=4,
        batch_wait_s=0.2,
        heartbeat_interval_s=0.5,
        heartbeat_ttl_s=2.0,
        job_time_limit_s=60,
        object_time_limit_s=1.0,
        max_masks=8,
        visibility_timeout_s=90,
    )
    s.start(wait=False)
    yield s
    s.stop()


@pytest.fixture
def batch_log(tmp_path):
    return tmp_path / "batches.jsonl"


@pytest.fixture
def workers(workers, batch_log):
    """``start(step_s)``: a cross-job worker on ``stack``, its passes logged to batch_log."""

    def run(step_s: float = 0.05, queues: str = "interactive,bulk"):
        env = {"SAM3D_FIXTURE_STEP_S": str(step_s), "SAM3D_FIXTURE_BATCH_LOG": str(batch_log)}
        return workers(BACKEND, queues, env)

    return run


def passes(batch_log) -> list[dict]:
    return [json.loads(line) for line in batch_log.read_text().splitlines()]


def wait_all(http, jobs, timeout=60) -> list[dict]:
    return [wait_until(http, j["id"], lambda v: v["status"] in TERMINAL, timeout) for j in jobs]


def test_queued_one_object_jobs_share_one_pass_each_with_its_own_record(http, workers, batch_log):
    jobs = [submit_json(http, [SQUARE_FLAT]) for _ in range(4)]
    workers()
    finals = wait_all(http, jobs)
    assert [f["status"] for f in finals] == ["succeeded"] * 4, [f.get("error") for f in finals]
    log = passes(batch_log)
    assert log[0] == {"jobs": sorted(j["id"] for j in jobs), "rows": 4}  # one shared pass
    for final in finals:
        assert final["attempts"] == 1
        assert final["progress"] == {"objects_done": 1, "objects_total": 1}
        assert [o["state"] for o in final["objects"]] == ["done"]
        assert {"mesh_glb", "gaussian_ply"} <= set(final["objects"][0])
    # The same image, mask and seed in each job: the same object, whichever row it had.
    assert len({json.dumps(f["objects"][0]["metadata"], sort_keys=True) for f in finals}) == 1
    # Their own messages, delivered after the batch took the jobs, were dropped: nothing ran
    # twice (one pass only, each job one attempt).
    time.sleep(1.0)
    assert len(passes(batch_log)) == 1
    assert [http.json("GET", f"/v1/jobs/{j['id']}")["attempts"] for j in jobs] == [1] * 4


def test_jobs_with_other_generation_options_are_not_batched(http, workers, batch_log):
    coarse = submit_json(http, [SQUARE_FLAT], options={"resolution": 24})
    fine = submit_json(http, [SQUARE_FLAT], options={"resolution": 32})
    workers()
    assert [f["status"] for f in wait_all(http, [coarse, fine])] == ["succeeded"] * 2
    assert [p["jobs"] for p in passes(batch_log)] == [[coarse["id"]], [fine["id"]]]  # alone


def test_a_job_failing_inside_a_batch_fails_alone(http, workers, batch_log):
    good = [submit_json(http, [SQUARE_FLAT, TRIANGLE_FLAT]) for _ in range(2)]
    bad = submit_json(http, [SQUARE_FLAT], options={"seed": 13})
    workers()
    first, second, poisoned = wait_all(http, [*good, bad])
    assert first["status"] == second["status"] == "succeeded"
    assert poisoned["status"] == "failed"
    assert poisoned["error"]["code"] == "backend_failed"
    assert "seed 13" in poisoned["error"]["message"]
    assert [f["attempts"] for f in (first, second, poisoned)] == [1, 1, 1]
    # One shared pass, which failed; then each job alone, through the backend's one-job path.
    assert [len(p["jobs"]) for p in passes(batch_log)] == [3]


def test_a_job_canceled_inside_a_batch_leaves_at_the_next_step(http, workers, batch_log):
    jobs = [submit_json(http, [SQUARE_FLAT, TRIANGLE_FLAT]) for _ in range(3)]
    workers(step_s=0.5)  # a pass of 10 steps: 5 s
    for job in jobs:
        wait_until(http, job["id"], lambda v: v["stage"] == "generating", 30)
    canceled = jobs[1]
    http.json("POST", f"/v1/jobs/{canceled['id']}/cancel")
    ended = wait_until(http, canceled["id"], lambda v: v["status"] in TERMINAL, 30)
    assert ended["status"] == "canceled"
    assert ended["progress"]["objects_done"] == 0
    others = wait_all(http, [jobs[0], jobs[2]])
    assert [o["status"] for o in others] == ["succeeded"] * 2
    log = passes(batch_log)
    # The pass restarted without the canceled job's rows; the others went on.
    assert log[0]["rows"] == 6 and canceled["id"] in log[0]["jobs"]
    assert log[1] == {"jobs": sorted([jobs[0]["id"], jobs[2]["id"]]), "rows": 4}


def test_a_lone_job_canceled_mid_pass_stops_at_the_next_step(http, workers, batch_log):
    job = submit_json(http, [SQUARE_FLAT, TRIANGLE_FLAT])
    workers(step_s=1.0)  # a pass of 10 s
    wait_until(http, job["id"], lambda v: v["stage"] == "generating", 30)
    http.json("POST", f"/v1/jobs/{job['id']}/cancel")
    canceled_at = time.monotonic()
    ended = wait_until(http, job["id"], lambda v: v["status"] in TERMINAL, 30)
    assert ended["status"] == "canceled" and ended["progress"]["objects_done"] == 0
    assert passes(batch_log) == [{"jobs": [job["id"]], "rows": 2}]  # not restarted
    # Not held until its pass ended: the next job starts at once (a pass is 10 s).
    after = submit_json(http, [SQUARE_FLAT])
    started = wait_until(http, after["id"], lambda v: v["status"] != "queued", 30)
    assert started["status"] in ("running", "succeeded")
    assert time.monotonic() - canceled_at < 9  # behaviour: its pass was cut, not waited out
    http.json("POST", f"/v1/jobs/{after['id']}/cancel")  # ended here, not by the next test
    wait_until(http, after["id"], lambda v: v["status"] in TERMINAL, 30)


def test_an_interactive_job_runs_first_and_never_with_bulk_rows(http, workers, batch_log):
    bulk = [submit_json(http, [SQUARE_FLAT], options={"priority": "bulk"}) for _ in range(3)]
    urgent = submit_json(http, [SQUARE_FLAT])
    workers()
    finals = wait_all(http, [*bulk, urgent])
    assert [f["status"] for f in finals] == ["succeeded"] * 4
    # The interactive job ran in the first pass: alone if it led (it takes no bulk
    # companions), or taken first by a bulk job that led; every job ran once.
    log = passes(batch_log)
    assert urgent["id"] in log[0]["jobs"]
    assert sorted(j for p in log for j in p["jobs"]) == sorted(j["id"] for j in [*bulk, urgent])
    if log[0]["jobs"] == [urgent["id"]]:
        assert log[1]["jobs"] == sorted(j["id"] for j in bulk)


def test_a_worker_killed_mid_batch_loses_no_job(stack, http, workers, batch_log):
    jobs = [submit_json(http, [SQUARE_FLAT, TRIANGLE_FLAT]) for _ in range(3)]
    victim = workers(step_s=1.0)  # a pass of 10 s
    views = [wait_until(http, j["id"], lambda v: v["stage"] == "generating", 30) for j in jobs]
    assert len({v["status"] for v in views}) == 1 and len(passes(batch_log)) == 1
    stack.kill_worker(victim)
    workers(step_s=0.05)
    finals = wait_all(http, jobs, timeout=60)
    assert [f["status"] for f in finals] == ["succeeded"] * 3, [f.get("error") for f in finals]
    assert [f["attempts"] for f in finals] == [2, 2, 2]  # each sent again once by the reaper
    for final in finals:
        assert final["progress"]["objects_done"] == 2
