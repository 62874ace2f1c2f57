"""The pydantic models of api/models.py are the document: the served /openapi.json's component
schemas equal the models' own JSON schemas for each backend (they cannot drift), ``Options``
has exactly the option tables' names, and a JSON submission's envelope is refused with the
stable codes and messages the API has always answered with."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from api import create_app
from api.models import (
    REF_TEMPLATE,
    JsonSubmission,
    document_models,
    model_schema,
    options_model,
    parse_batch_body,
    parse_json_body,
)
from jobs.errors import ErrorCode, Sam3dError
from jobs.options import BACKEND_OPTIONS, COMMON_OPTIONS
from jobs.settings import Settings


def _served(tmp_path, backend: str) -> dict:
    app = create_app(Settings(backend=backend, storage_url=f"file://{tmp_path / 'storage'}"))
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


@pytest.mark.parametrize("backend", sorted(BACKEND_OPTIONS))
def test_served_components_are_the_models_schemas(tmp_path, backend):
    spec = _served(tmp_path, backend)
    validate(spec)
    components = spec["components"]["schemas"]
    for model in document_models(backend):
        schema = model_schema(model)
        defs = schema.pop("$defs", {})
        assert components[model.__name__] == schema, model.__name__
        for name, nested in defs.items():
            assert components[name] == nested, f"{model.__name__}: {name}"
    # Every reference in the document resolves to a component.
    text = str(spec)
    prefix = REF_TEMPLATE.format(model="")
    for ref in {part.split("'")[0] for part in text.split(prefix)[1:]}:
        assert ref in components, ref


@pytest.mark.parametrize("backend", sorted(BACKEND_OPTIONS))
def test_options_are_the_option_tables(backend):
    fields = options_model(backend).model_fields
    tables = COMMON_OPTIONS + BACKEND_OPTIONS[backend]
    assert set(fields) == {"priority", *(o.name for o in tables)}
    for option in tables:
        assert fields[option.name].default == option.default
        assert fields[option.name].description == option.doc
    schema = model_schema(options_model(backend))
    assert schema["additionalProperties"] is False
    if backend == "inflate":
        assert schema["properties"]["resolution"]["minimum"] == 16
        assert "fast" not in schema["properties"]
    else:
        assert schema["properties"]["splats_per_voxel"]["enum"] == [4, 32]


IMAGE = {"type": "base64", "value": "aGk="}


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ([], ErrorCode.INVALID_REQUEST, "a job must be a JSON object"),
        ({"image": IMAGE, "zz": 1, "aa": 2}, ErrorCode.INVALID_REQUEST, "unknown field(s): aa, zz"),
        ({}, ErrorCode.INVALID_REQUEST, '"image" must be {"type": "base64" | "url" | "key", '),
        ({"image": "x"}, ErrorCode.INVALID_REQUEST, '"image" must be {'),
        ({"image": {"type": "ftp", "value": "x"}}, ErrorCode.INVALID_REQUEST, '"image" must be'),
        ({"image": {"type": "url", "value": ""}}, ErrorCode.INVALID_REQUEST, '"image.value" must'),
        ({"image": {"type": "url", "value": 3}}, ErrorCode.INVALID_REQUEST, '"image.value" must'),
        ({"image": IMAGE, "file_name": 3}, ErrorCode.INVALID_REQUEST, "file_name must be a str"),
        ({"image": IMAGE, "image_id": "x"}, ErrorCode.INVALID_REQUEST, "image_id must be an int"),
        ({"image": IMAGE, "image_id": True}, ErrorCode.INVALID_REQUEST, "image_id must be an int"),
        ({"image": IMAGE, "image_id": 1.5}, ErrorCode.INVALID_REQUEST, "image_id must be an int"),
        ({"image": IMAGE, "depth": {"type": "key"}}, ErrorCode.INVALID_REQUEST, '"depth" must be'),
        (
            {"image": IMAGE, "pointmap": {"type": "url", "value": ""}},
            ErrorCode.INVALID_REQUEST,
            '"pointmap.value" must be a non-empty string',
        ),
        ({"image": IMAGE, "mask_format": "gif"}, ErrorCode.INVALID_MASK, "unknown mask_format"),
    ],
)
def test_the_envelope_is_refused_with_the_stable_codes(body, code, message):
    with pytest.raises(Sam3dError) as caught:
        parse_json_body(body, "inflate")
    assert caught.value.code is code
    assert caught.value.message.startswith(message), caught.value.message


def test_the_envelope_passes_what_jobs_checks_later_untouched():
    masks = [[[0, 1], [1, 0]]]
    job = parse_json_body(
        {"image": IMAGE, "mask_input": masks, "options": {"seed": "x"}, "image_id": "7"},
        "inflate",
    )
    assert isinstance(job, JsonSubmission)
    assert job.mask_input is masks  # not copied: masks can be large
    assert job.options == {"seed": "x"}  # parse_options refuses it, with its own message
    assert job.image_id == 7
    assert parse_json_body({"image": IMAGE, "image_id": ""}, "sam3d").image_id is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, 'send {"jobs": [job, ...]} with at least one job'),
        ({"jobs": []}, 'send {"jobs": [job, ...]} with at least one job'),
        ({"jobs": "x", "zz": 1}, 'send {"jobs": [job, ...]} with at least one job'),
        ({"jobs": [{}], "zz": 1, "aa": 2}, "unknown field(s): aa, zz"),
    ],
)
def test_the_batch_envelope_is_refused_with_the_stable_codes(body, message):
    with pytest.raises(Sam3dError) as caught:
        parse_batch_body(body, "inflate")
    assert (caught.value.code, caught.value.message) == (ErrorCode.INVALID_REQUEST, message)


def test_a_batch_passes_its_jobs_on_as_sent():
    jobs = [{"image": IMAGE, "nonsense": 1}]  # refused later, as jobs[0]
    assert parse_batch_body({"jobs": jobs}, "sam3d").jobs is jobs
