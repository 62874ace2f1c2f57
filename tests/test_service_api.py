"""The job service end to end over HTTP: a real redis-server, real Celery worker processes,
the API served by gunicorn, local-disk storage behind signed URLs."""

from __future__ import annotations

import gzip
import json
import re
import time
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit, urlunsplit

import numpy as np
import pytest
from readers import read_ply
from sam3d_client.http import ApiError, Http, artifact_urls
from service import (
    FAST,
    SQUARE_FLAT,
    b64,
    bomb_png,
    listed_files,
    make_stack,
    manifest_of,
    mask_inputs,
    png,
    scene_image,
    scene_masks,
    submit_json,
    wait_until,
)

from jobs.storage import FileStorage

MAX_MASKS = 6


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One fast inflate worker on 'interactive'; one slow fixture worker on 'bulk'."""
    s = make_stack(
        tmp_path_factory.mktemp("stack"), max_masks=MAX_MASKS, max_image_pixels=5_000_000
    )
    s.start(wait=False)
    s.start_worker(backend="inflate", queues="interactive")
    s.start_worker(backend="fixture_backends:SlowInflate", queues="bulk")
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(stack) -> Http:
    return Http(stack.url)


def raw_get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


# -- mask formats end to end -----------------------------------------------------------------


@pytest.mark.parametrize("family", list(mask_inputs()))
def test_each_mask_format_family_end_to_end(http, family):
    mask_input, objects = mask_inputs()[family]
    accepted = submit_json(http, mask_input, options={"seed": 3})
    assert accepted["status"] == "queued" and accepted["links"]["self"].endswith(accepted["id"])
    job = http.wait(accepted["id"], timeout=60)
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == {"objects_done": objects, "objects_total": objects}
    assert len(job["result"]["objects"]) == objects
    manifest = manifest_of(http, job)
    assert manifest["job_id"] == job["id"] and manifest["seed"] == 3
    assert manifest["options"]["splats"] == FAST["splats"]


def test_multipart_with_png_files_and_json_masks(http, tmp_path):
    masks = scene_masks()
    result = http.post_multipart(
        "/v1/jobs",
        {"mask_input": json.dumps(SQUARE_FLAT), "options": json.dumps(FAST)},
        [("image", "scene.png", scene_image()), ("mask", "m0.png", png(masks[0]))],
    )
    job = http.wait(result["id"], timeout=60)
    assert job["status"] == "succeeded", job["error"]
    manifest = manifest_of(http, job)
    # mask_input's objects first, then the PNG files, in order.
    assert manifest["objects"][0]["mask"]["bbox"] == [100, 30, 40, 40]
    assert manifest["objects"][1]["mask"]["area"] == int(masks[0].sum())


def test_succeeded_job_shape_and_every_artifact_downloads(http, tmp_path):
    job = http.wait(submit_json(http, mask_inputs()["list of binary masks"][0])["id"])
    assert set(job) >= {
        "id", "status", "stage", "progress", "queue_position", "created_at", "started_at",
        "finished_at", "error", "result",
    }  # fmt: skip
    assert job["queue_position"] is None and job["error"] is None
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    result = job["result"]
    assert result["time"] > 0
    for obj in result["objects"]:
        assert set(obj["metadata"]) == {"rotation", "translation", "scale", "matrix"}
    for path, url in artifact_urls(result).items():
        size = http.download(url, tmp_path / path)
        assert size > 0
    _, table, fmt = read_ply(tmp_path / "scene.ply")
    assert fmt == "format binary_little_endian 1.0" and len(table) == 2 * FAST["splats"]
    art = result["scene"]["mesh_glb"]
    assert art["content_type"] == "model/gltf-binary"
    assert art["bytes"] == (tmp_path / "scene.glb").stat().st_size
    status, _, headers = raw_get(art["url"])
    assert status == 200 and headers["Content-Type"] == "model/gltf-binary"
    assert headers["Content-Disposition"].startswith("attachment;")
    # URLs are minted fresh on every GET: a second later, a later expiry and a new signature.
    time.sleep(1.05)
    again = http.json("GET", f"/v1/jobs/{job['id']}")["result"]["scene"]["mesh_glb"]
    assert _expires(again["url"]) > _expires(art["url"])
    assert again["url"] != art["url"] and again["expires_at"] > art["expires_at"]
    assert raw_get(again["url"])[0] == 200


def _expires(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["expires"][0])


def test_formats_listed_downloaded_and_gzip_served(http, tmp_path):
    formats = {"objects": ["spz", "splats_glb", "ply"], "scene": ["spz", "glb"]}
    job = http.wait(
        submit_json(http, mask_inputs()["list of binary masks"][0], options={"formats": formats})[
            "id"
        ]
    )
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert sorted(k for k in result["scene"] if k != "num_splats") == ["gaussian_spz", "mesh_glb"]
    for listing in (result["objects"], job["objects"]):
        for obj in listing:
            assert {"gaussian_spz", "splats_glb", "gaussian_ply"} <= set(obj)
            assert "mesh_glb" not in obj
    urls = artifact_urls(result)
    assert sorted(urls) == [
        "manifest.json", "objects/0.ply", "objects/0.splats.glb", "objects/0.spz",
        "objects/1.ply", "objects/1.splats.glb", "objects/1.spz", "scene.glb", "scene.spz",
    ]  # fmt: skip
    for path, url in urls.items():
        assert http.download(url, tmp_path / path) > 0
    canonical = {"objects": ["ply", "spz", "splats_glb"], "scene": ["glb", "spz"]}
    assert manifest_of(http, job)["options"]["formats"] == canonical
    # gzip only when asked, for PLY and GLB; the bytes are the same once inflated
    for path in ("objects/0.ply", "scene.glb", "scene.spz"):
        req = urllib.request.Request(urls[path], headers={"Accept-Encoding": "gzip, br"})
        with urllib.request.urlopen(req) as resp:
            body, encoding = resp.read(), resp.headers.get("Content-Encoding")
        plain = (tmp_path / path).read_bytes()
        if path.endswith(".spz"):
            assert encoding is None and body == plain
        else:
            assert encoding == "gzip" and gzip.decompress(body) == plain
            assert len(body) < len(plain)
    status, body, headers = raw_get(urls["objects/0.ply"])
    assert status == 200 and "Content-Encoding" not in headers
    assert body == (tmp_path / "objects/0.ply").read_bytes()


# -- bad input ---------------------------------------------------------------------------------


def _bad_requests():
    masks = scene_masks()
    image = b64(scene_image())
    ok_masks = masks.astype(int).tolist()
    return {
        "invalid_image": (
            {"image": {"type": "base64", "value": b64(b"GIF89a....")}, "mask_input": ok_masks},
            400,
        ),
        "invalid_image (not base64)": (
            {"image": {"type": "base64", "value": "***"}, "mask_input": ok_masks},
            400,
        ),
        "invalid_image (private url)": (
            {"image": {"type": "url", "value": "http://127.0.0.1:1/x.png"}, "mask_input": ok_masks},
            400,
        ),
        "image_too_large": (
            {"image": {"type": "base64", "value": b64(bomb_png())}, "mask_input": ok_masks},
            413,
        ),
        "invalid_mask": (
            {"image": {"type": "base64", "value": image}, "mask_input": {"nope": 1}},
            400,
        ),
        "invalid_mask (format)": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": ok_masks,
                "mask_format": "jpeg",
            },
            400,
        ),
        "mask_size_mismatch": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": np.ones((10, 10), int).tolist(),
            },
            422,
        ),
        "empty_mask": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": [np.zeros((120, 160), int).tolist()],
            },
            422,
        ),
        "too_many_masks": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": [SQUARE_FLAT] * (MAX_MASKS + 1),
            },
            422,
        ),
        "invalid_option": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": ok_masks,
                "options": {"fov_deg": -1},
            },
            400,
        ),
        "invalid_option (priority)": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": ok_masks,
                "options": {"priority": "vip"},
            },
            400,
        ),
        "invalid_option (formats)": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": ok_masks,
                "options": {"formats": ["glb", "fbx"]},
            },
            400,
        ),
        "invalid_option (mesh)": (
            {
                "image": {"type": "base64", "value": image},
                "mask_input": ok_masks,
                "options": {"mesh": {"target_faces": 0}},
            },
            400,
        ),
        "invalid_request": ({"mask_input": ok_masks, "image": "just a string"}, 400),
        "invalid_request (field)": (
            {"image": {"type": "base64", "value": image}, "mask_input": ok_masks, "colour": "red"},
            400,
        ),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_is_a_clear_4xx_and_creates_no_job(http, case):
    body, status = _bad_requests()[case]
    before = http.json("GET", "/v1/jobs?limit=100")["jobs"]
    with pytest.raises(ApiError) as info:
        http.json("POST", "/v1/jobs", body)
    assert info.value.status == status
    assert info.value.code == case.split(" ")[0]
    assert info.value.message
    assert http.json("GET", "/v1/jobs?limit=100")["jobs"] == before


@pytest.mark.parametrize(
    ("payload", "content_type", "code"),
    [
        (b"{not json", "application/json", "invalid_request"),
        (b"[1, 2]", "application/json", "invalid_request"),
        (b"image=1", "application/x-www-form-urlencoded", "invalid_request"),
    ],
)
def test_malformed_bodies_are_400(stack, payload, content_type, code):
    req = urllib.request.Request(
        stack.url + "/v1/jobs", data=payload, method="POST", headers={"Content-Type": content_type}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]["code"] == code


def test_multipart_without_image_and_bad_options_json(http):
    with pytest.raises(ApiError) as info:
        http.post_multipart("/v1/jobs", {"mask_input": "[]"}, [])
    assert (info.value.status, info.value.code) == (400, "invalid_request")
    with pytest.raises(ApiError) as info:
        http.post_multipart(
            "/v1/jobs",
            {"mask_input": json.dumps(SQUARE_FLAT), "options": "{"},
            [("image", "a.png", scene_image())],
        )
    assert info.value.code == "invalid_request"


def test_bad_input_never_disturbs_other_jobs(http):
    good = submit_json(http, SQUARE_FLAT)
    for body, _ in _bad_requests().values():
        with pytest.raises(ApiError):
            http.json("POST", "/v1/jobs", body)
    assert http.wait(good["id"])["status"] == "succeeded"


def test_unknown_job_and_route_are_404_json(http):
    for method, path in [("GET", "/v1/jobs/job_nope"), ("POST", "/v1/jobs/job_nope/cancel"),
                         ("DELETE", "/v1/jobs/job_nope"), ("GET", "/v1/nothing")]:  # fmt: skip
        with pytest.raises(ApiError) as info:
            http.json(method, path)
        assert info.value.status == 404


# -- cancel, idempotency, listing, delete -----------------------------------------------------


def test_cancel_while_queued(http, stack):
    blocker = submit_json(http, [SQUARE_FLAT] * 2, options={"priority": "bulk"})
    wait_until(http, blocker["id"], lambda j: j["status"] == "running")
    queued = submit_json(http, SQUARE_FLAT, options={"priority": "bulk"})
    job = http.json("GET", f"/v1/jobs/{queued['id']}")
    assert job["status"] == "queued" and job["queue_position"] == 0 and job["queue"] == "bulk"
    canceled = http.json("POST", f"/v1/jobs/{queued['id']}/cancel")
    assert canceled["status"] == "canceled"
    assert http.wait(blocker["id"])["status"] == "succeeded"
    time.sleep(0.5)  # the canceled job's message has been consumed by now; it must not run
    job = http.json("GET", f"/v1/jobs/{queued['id']}")
    assert job["status"] == "canceled" and job["started_at"] is None and job["attempts"] == 0
    assert listed_files(stack.data_dir, queued["id"]) == ["input/image", "input/masks.json"]


def test_cancel_while_running_stops_between_objects(http, stack):
    job = submit_json(http, [SQUARE_FLAT] * 4, options={"priority": "bulk"})
    wait_until(http, job["id"], lambda j: j["progress"]["objects_done"] >= 1)
    answer = http.json("POST", f"/v1/jobs/{job['id']}/cancel")
    assert answer["cancel_requested"] is True
    final = http.wait(job["id"])
    assert final["status"] == "canceled"
    done = final["progress"]["objects_done"]
    assert 1 <= done < 4
    # The objects finished before the cancel are kept and listed; no scene is made.
    assert [o["state"] for o in final["objects"]] == ["done"] * done + ["pending"] * (4 - done)
    files = listed_files(stack.data_dir, job["id"])
    assert sorted(f for f in files if f.endswith(".glb")) == [
        f"objects/{i}.glb" for i in range(done)
    ]
    assert "scene.glb" not in files and "manifest.json" not in files
    with pytest.raises(ApiError) as info:
        http.json("POST", f"/v1/jobs/{blocker_done(http)}/cancel")
    assert info.value.code == "already_finished"


def blocker_done(http) -> str:
    return http.json("GET", "/v1/jobs?status=succeeded&limit=1")["jobs"][0]["id"]


def test_idempotency_key_gives_the_same_job(http):
    key = {"Idempotency-Key": f"abc-{time.time()}"}
    first = submit_json(http, SQUARE_FLAT, headers=key)
    second = submit_json(http, SQUARE_FLAT, headers=key)
    other = submit_json(http, SQUARE_FLAT, headers={"Idempotency-Key": f"other-{time.time()}"})
    assert first["id"] == second["id"] != other["id"]
    ids = [j["id"] for j in http.json("GET", "/v1/jobs?limit=100")["jobs"]]
    assert ids.count(first["id"]) == 1
    assert http.wait(first["id"])["status"] == "succeeded"


def test_list_newest_first_with_filter_and_cursor(http):
    ids = [submit_json(http, SQUARE_FLAT)["id"] for _ in range(5)]
    for job_id in ids:
        http.wait(job_id)
    page = http.json("GET", "/v1/jobs?limit=3")
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:3] and page["next"]
    rest = http.json("GET", f"/v1/jobs?limit=2&cursor={page['next']}")
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][3:5]
    succeeded = http.json("GET", "/v1/jobs?status=succeeded&limit=100")["jobs"]
    assert {j["status"] for j in succeeded} == {"succeeded"}
    for query in ("status=done", "limit=0", "limit=x", "cursor=%21%21"):
        with pytest.raises(ApiError) as info:
            http.json("GET", f"/v1/jobs?{query}")
        assert info.value.status == 400


def test_delete_removes_record_and_artifacts(http, stack):
    job = http.wait(submit_json(http, SQUARE_FLAT)["id"])
    url = job["result"]["scene"]["mesh_glb"]["url"]
    assert raw_get(url)[0] == 200
    assert listed_files(stack.data_dir, job["id"])
    http.json("DELETE", f"/v1/jobs/{job['id']}")
    assert listed_files(stack.data_dir, job["id"]) == []
    assert raw_get(url)[0] == 404
    with pytest.raises(ApiError) as info:
        http.json("GET", f"/v1/jobs/{job['id']}")
    assert info.value.status == 404


def test_delete_running_job_is_refused(http):
    job = submit_json(http, [SQUARE_FLAT] * 2, options={"priority": "bulk"})
    wait_until(http, job["id"], lambda j: j["status"] == "running")
    with pytest.raises(ApiError) as info:
        http.json("DELETE", f"/v1/jobs/{job['id']}")
    assert (info.value.status, info.value.code) == (409, "job_running")
    assert http.wait(job["id"])["status"] == "succeeded"


# -- signed URLs -----------------------------------------------------------------------------


def test_signed_url_tampering_and_expiry_are_403(http, stack):
    job = http.wait(submit_json(http, SQUARE_FLAT)["id"])
    url = job["result"]["objects"][0]["gaussian_ply"]["url"]
    parts = urlsplit(url)
    query = dict(p.split("=") for p in parts.query.split("&"))
    flipped = query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")
    tampered = {
        "signature": urlunsplit(parts._replace(query=f"expires={query['expires']}&sig={flipped}")),
        "key": url.replace("objects/0.ply", "objects/0.glb"),
        "expiry": urlunsplit(
            parts._replace(query=f"expires={int(query['expires']) + 3600}&sig={query['sig']}")
        ),
        "missing": urlunsplit(parts._replace(query="")),
    }
    for name, bad in tampered.items():
        status, body, _ = raw_get(bad)
        assert status == 403, name
        assert json.loads(body)["error"]["code"] == "forbidden"
    # An honestly signed URL that has expired (same key file as the API: same secret).
    storage = FileStorage(stack.data_dir / "storage")
    expired = storage.signed_url(
        f"jobs/{job['id']}/objects/0.ply", expires_in=-5, base_url=stack.url
    )
    status, body, _ = raw_get(expired.url)
    assert status == 403 and "expired" in json.loads(body)["error"]["message"]
    fresh = storage.signed_url(f"jobs/{job['id']}/objects/0.ply", expires_in=60, base_url=stack.url)
    assert raw_get(fresh.url)[0] == 200


# -- health, metrics, OpenAPI ----------------------------------------------------------------


def test_health_ready_and_metrics(http, stack):
    assert http.json("GET", "/healthz") == {"status": "ok"}
    ready = http.json("GET", "/readyz")
    assert ready["ready"] is True and ready["checks"]["workers"]["ready"] == 2
    backends = {w["backend"] for w in ready["checks"]["workers"]["details"]}
    assert backends == {"inflate", "slow-inflate"}
    status, body, _ = raw_get(stack.url + "/metrics")
    text = body.decode()
    assert status == 200
    for name in (
        'sam3d_queue_depth{queue="interactive"}',
        'sam3d_queue_depth{queue="bulk"}',
        'sam3d_jobs{status="succeeded"}',
        'sam3d_workers{state="ready"}',
        'sam3d_stage_duration_seconds_bucket{le="+Inf",stage="generating"}',
        'sam3d_stage_duration_seconds_count{stage="uploading"}',
    ):
        assert name in text, name


def test_openapi_describes_every_route(http, stack):
    from openapi_spec_validator import validate

    spec = http.json("GET", "/openapi.json")
    validate(spec)
    from api import create_app

    app = create_app(stack.settings)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <path:key> -> {key}
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    documented = {(p, m) for p, ops in spec["paths"].items() for m in ops if m != "parameters"}
    assert routes == documented
