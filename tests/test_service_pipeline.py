"""Objects delivered as they finish, and budgets checked at submit: a real redis-server, a
real Celery worker (the slow fixture backend: 1 s per object), the API over HTTP, the SDK."""

from __future__ import annotations

import time
import urllib.request

import pytest
from sam3d_client import Client
from sam3d_client.http import ApiError, Http
from service import FAST, SQUARE_FLAT, TRIANGLE_FLAT, make_stack, scene_image, submit_json

from jobs.heartbeat import worker_index_key


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("pipeline"), max_job_output_bytes=50_000_000)
    s.start(wait=False)
    s.start_worker(backend="fixture_backends:SlowInflate")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Http:
    return Http(stack.url)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as resp:
        return resp.read()


def test_each_object_is_listed_with_its_files_while_the_job_still_runs(http):
    job = submit_json(http, [SQUARE_FLAT, TRIANGLE_FLAT, SQUARE_FLAT])
    deadline = time.monotonic() + 30
    while True:
        view = http.json("GET", f"/v1/jobs/{job['id']}")
        if view["progress"]["objects_done"] >= 1:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["status"] == "running" and view["result"] is None
    states = [o["state"] for o in view["objects"]]
    assert states[0] == "done" and states[-1] == "pending" and len(states) == 3
    first = view["objects"][0]
    assert fetch(first["mesh_glb"]["url"])[:4] == b"glTF"
    ply = fetch(first["gaussian_ply"]["url"])
    assert ply.startswith(b"ply\n") and len(ply) == first["gaussian_ply"]["bytes"]
    assert len(first["metadata"]["matrix"]) == 4
    final = http.wait(job["id"], timeout=60)
    assert final["status"] == "succeeded"
    assert [o["state"] for o in final["objects"]] == ["done"] * 3
    # The object stored while the job ran is the one in the result and the scene.
    assert final["result"]["objects"][0]["metadata"] == first["metadata"]
    assert final["result"]["objects"][0]["gaussian_ply"]["bytes"] == len(ply)


def test_sdk_iterates_objects_as_they_finish(stack):
    client = Client(stack.url)
    job = client.submit(scene_image(), [SQUARE_FLAT, TRIANGLE_FLAT], **FAST)
    seen = []
    for obj in job.objects(timeout=60, poll_interval=0.05):
        seen.append((obj.index, job.status))
        assert obj.mesh_glb.read()[:4] == b"glTF"
        assert obj.gaussian_ply.size == len(obj.gaussian_ply.read())
    assert [index for index, _ in seen] == [0, 1]
    assert seen[0][1] == "running"  # the first came before the job ended
    assert job.status == "succeeded"
    assert [o.index for o in job.result().objects] == [0, 1]


def test_sdk_objects_of_a_canceled_job_end_with_jobcanceled(stack):
    from sam3d_client import JobCanceled

    client = Client(stack.url)
    job = client.submit(scene_image(), [SQUARE_FLAT] * 4, **FAST)
    got = []
    with pytest.raises(JobCanceled):
        for obj in job.objects(timeout=60, poll_interval=0.05):
            got.append(obj.index)
            if len(got) == 1:
                job.cancel()
    assert 1 <= len(got) < 4 and got == list(range(len(got)))
    assert [o.index for o in job.finished_objects] == got


def test_a_job_over_the_output_budget_is_refused_at_submit(http):
    # 2 objects x 200k splats: ~27 MB each (object PLY plus its share of scene.ply) > 50 MB.
    with pytest.raises(ApiError) as info:
        submit_json(http, [SQUARE_FLAT, TRIANGLE_FLAT], options={"splats": 200_000})
    assert info.value.status == 422 and info.value.code == "job_too_large"
    assert "the limit is 50 MB (SAM3D_MAX_JOB_OUTPUT_BYTES)" in info.value.message
    accepted = submit_json(http, [SQUARE_FLAT], options={"splats": 200_000})
    assert accepted["status"] == "queued"
    assert http.wait(accepted["id"], timeout=60)["status"] == "succeeded"


def test_workers_are_found_through_the_index_not_a_scan(stack, http):
    import redis

    client = redis.Redis.from_url(stack.settings.redis_url)
    names = [n.decode() for n in client.zrange(worker_index_key(), 0, -1)]
    assert len(names) == 1
    ready = http.json("GET", "/readyz")
    assert [w["name"] for w in ready["checks"]["workers"]["details"]] == names
    # A stale entry (a worker that vanished without a goodbye) is not counted as live.
    client.zadd(worker_index_key(), {"ghost:1": time.time() - 1})
    assert len(http.json("GET", "/readyz")["checks"]["workers"]["details"]) == 1
    assert client.zscore(worker_index_key(), "ghost:1") is None
