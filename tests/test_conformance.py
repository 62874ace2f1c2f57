"""Live responses against the live OpenAPI document: every answer's status is documented for
its route, and its JSON body validates against the documented schema (error codes included,
which each route lists from the registry). Separate from schemathesis: these are the real
flows (a job that succeeds, is canceled, deleted; uploads; batches; signed files)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sam3d_client.http import multipart
from service import FAST, SQUARE_FLAT, b64, make_stack, scene_image, scene_masks

from api import models

SPEC_URI = "urn:sam3d:openapi"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = make_stack(tmp_path_factory.mktemp("conformance"), max_masks=4)
    s.start(wait=False)
    s.start_worker(backend="inflate", queues="interactive,bulk")
    s.wait_ready()
    yield s
    s.stop()


class Checker:
    """Sends requests and checks each answer against the spec the server itself serves."""

    def __init__(self, base: str) -> None:
        self.base = base
        with urllib.request.urlopen(base + "/openapi.json") as resp:
            self.spec = json.loads(resp.read())
        self.registry = Registry().with_resource(
            SPEC_URI, Resource.from_contents(self.spec, default_specification=DRAFT202012)
        )
        self.checked: set[tuple[str, str, int]] = set()

    def _operation(self, path: str, method: str) -> tuple[str, dict]:
        bare = path.split("?")[0]
        for template, ops in self.spec["paths"].items():
            pattern = re.sub(r"\\\{(\w+)\\\}", "[^?]+", re.escape(template)) + "$"
            if re.match(pattern, bare) and method in ops:
                return template, ops[method]
        raise AssertionError(f"{method.upper()} {bare} is not in the spec")

    def validate(self, pointer: str, instance: object) -> None:
        validator = jsonschema.Draft202012Validator(
            {"$ref": f"{SPEC_URI}#{pointer}"}, registry=self.registry
        )
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.path))
        assert not errors, f"{pointer}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5]
        )

    def call(self, method: str, path: str, body=None, *, content_type=None, headers=None):
        data = body
        if body is not None and content_type is None:
            data, content_type = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method.upper())
        if content_type:
            request.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            request.add_header(k, v)
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers["Content-Type"]
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers["Content-Type"]
        template, operation = self._operation(path, method.lower())
        responses = operation["responses"]
        assert str(status) in responses, (
            f"{method.upper()} {template} answered {status}, documented: {sorted(responses)}: "
            f"{raw[:300]!r}"
        )
        self.checked.add((template, method.lower(), status))
        documented = responses[str(status)].get("content", {})
        if ctype and ctype.startswith("application/json"):
            assert "application/json" in documented, f"{template} {status}: JSON not documented"
            value = json.loads(raw)
            escaped = template.replace("~", "~0").replace("/", "~1")
            pointer = f"/paths/{escaped}/{method.lower()}/responses/{status}"
            self.validate(pointer + "/content/application~1json/schema", value)
            return status, value
        return status, raw


@pytest.fixture(scope="module")
def api(stack) -> Checker:
    return Checker(stack.url)


def _job_body(**extra) -> dict:
    body = {
        "image": {"type": "base64", "value": b64(scene_image())},
        "mask_input": [SQUARE_FLAT],
        "options": dict(FAST),
    }
    body.update(extra)
    return body


def _wait(api: Checker, job_id: str) -> dict:
    import time

    deadline = time.monotonic() + 60
    while True:
        _, job = api.call("get", f"/v1/jobs/{job_id}")
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


def test_a_job_from_submit_to_delete_conforms(api):
    status, accepted = api.call("post", "/v1/jobs", _job_body(), headers={"Idempotency-Key": "c1"})
    assert status == 202
    job = _wait(api, accepted["id"])
    assert job["status"] == "succeeded"
    # The models the document comes from read the live answers too.
    models.Accepted.model_validate(accepted)
    models.Job.model_validate(job)
    # The same key for another request; cancel and delete of a finished job; the list.
    status, error = api.call(
        "post", "/v1/jobs", _job_body(options={"seed": 9}), headers={"Idempotency-Key": "c1"}
    )
    assert (status, error["error"]["code"]) == (422, "idempotency_mismatch")
    assert api.call("post", f"/v1/jobs/{job['id']}/cancel")[0] == 409
    assert api.call("get", "/v1/jobs?limit=5")[0] == 200
    assert api.call("get", "/v1/jobs?limit=0")[0] == 400
    assert api.call("get", "/v1/jobs?status=nope")[0] == 400
    # A signed file URL, then one tampered with.
    url = job["result"]["scene"]["mesh_glb"]["url"]
    path = url[url.index("/files/") :]
    assert api.call("get", path)[0] == 200
    # Tampered: the signature's first character changed (never to itself).
    tampered = re.sub(r"sig=(\w)", lambda m: "sig=" + "01"[m[1] == "0"], path)
    assert api.call("get", tampered)[0] == 403
    assert api.call("delete", f"/v1/jobs/{job['id']}")[0] == 204
    assert api.call("get", f"/v1/jobs/{job['id']}")[0] == 404
    assert api.call("post", f"/v1/jobs/{job['id']}/cancel")[0] == 404


def test_multipart_submit_and_cancel_conform(api):
    fields = {"options": json.dumps({**FAST, "priority": "bulk"})}
    masks = scene_masks()
    from service import png

    data, ctype = multipart(
        fields, [("image", "scene.png", scene_image()), ("mask", "m.png", png(masks[0]))]
    )
    status, accepted = api.call("post", "/v1/jobs", data, content_type=ctype)
    assert status == 202
    status, _ = api.call("post", f"/v1/jobs/{accepted['id']}/cancel")
    assert status in (200, 202, 409)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"image": {"type": "base64", "value": "!!"}, "mask_input": [SQUARE_FLAT]}, 400, None),
        (_job_body(mask_input="not a mask"), 400, "invalid_mask"),
        (_job_body(mask_input=[[0, 1, 0], [1, 1, 1], [0, 1, 0]]), 422, "mask_size_mismatch"),
        (_job_body(mask_input=[SQUARE_FLAT] * 5), 422, "too_many_masks"),
        (_job_body(options={"fast": True}), 400, "invalid_option"),  # sam3d's, not inflate's
        (_job_body(nonsense=1), 400, "invalid_request"),
    ],
)
def test_refused_submissions_conform(api, body, status, code):
    got, error = api.call("post", "/v1/jobs", body)
    assert got == status
    assert code is None or error["error"]["code"] == code


def test_the_spec_refuses_what_the_server_refuses(api):
    # Options are the configured backend's: inflate has no "fast", sam3d's option.
    schema = "/components/schemas/JsonSubmission"
    api.validate(schema, _job_body())
    with pytest.raises(AssertionError):
        api.validate(schema, _job_body(options={"fast": True}))
    post = api.spec["paths"]["/v1/jobs"]["post"]["responses"]
    codes = post["409"]["content"]["application/json"]["schema"]["properties"]["error"]
    assert "conflict" in codes["properties"]["code"]["enum"]


def test_the_served_components_are_the_models(api):
    served = api.spec["components"]["schemas"]
    assert {name: served[name] for name in models.component_schemas("inflate")} == (
        models.component_schemas("inflate")
    )


def test_uploads_and_batches_conform(api):
    status, upload = api.call("post", "/v1/uploads", scene_image(), content_type="image/png")
    assert status == 201
    body = {"jobs": [_job_body(image={"type": "key", "value": upload["key"]})]}
    status, batch = api.call("post", "/v1/batches", body)
    assert status == 202
    assert api.call("get", f"/v1/batches/{batch['id']}")[0] == 200
    assert api.call("get", "/v1/batches/batch_nope")[0] == 404
    assert api.call("post", "/v1/batches", {"jobs": []})[0] == 400
    name = upload["key"].rsplit("/", 1)[-1]
    assert api.call("delete", f"/v1/uploads/{name}")[0] == 204
    assert api.call("delete", f"/v1/uploads/{name}")[0] == 404


def test_service_routes_conform(api):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert api.call("get", path)[0] == 200
    status, _ = api.call("post", "/sam3_3d/infer", {"image": "x"}, content_type=None)
    assert status == 400
