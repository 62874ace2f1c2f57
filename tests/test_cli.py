"""The ``sam3d-jobs generate`` command, run as a user runs it: a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE_COCO, SAMPLE_IMAGE
from PIL import Image

CLI = str(Path(sys.executable).parent / "sam3d-jobs")


def generate(*args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [CLI, "generate", *args]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_generate_sample_from_coco_file(tmp_path, sample_masks):
    result = generate(str(SAMPLE_IMAGE), "--masks", str(SAMPLE_COCO), out=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [o["mask"]["area"] for o in manifest["objects"]] == [int(m.sum()) for m in sample_masks]
    for path in ["scene.glb", "scene.ply", "objects/0.glb", "objects/2.ply", "manifest.json"]:
        assert (tmp_path / path).stat().st_size > 0
        assert str(tmp_path / path) in result.stdout


def test_generate_with_repeated_png_masks_keeps_their_order(tmp_path, sample_masks):
    paths = []
    for i in (2, 0):
        path = tmp_path / f"mask{i}.png"
        Image.fromarray(sample_masks[i].astype(np.uint8) * 255).save(path)
        paths += ["--masks", str(path)]
    result = generate(str(SAMPLE_IMAGE), *paths, "--seed", "5", out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    areas = [o["mask"]["area"] for o in manifest["objects"]]
    assert areas == [int(sample_masks[2].sum()), int(sample_masks[0].sum())]
    assert manifest["seed"] == 5


def test_generate_with_npy_stack_and_options(tmp_path, sample_masks):
    np.save(tmp_path / "masks.npy", sample_masks[:2])
    result = generate(
        str(SAMPLE_IMAGE),
        "--masks",
        str(tmp_path / "masks.npy"),
        "--options",
        '{"fov_deg": 45, "splats": 500}',
        out=tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert len(manifest["objects"]) == 2
    assert manifest["options"]["fov_deg"] == 45.0
    assert manifest["objects"][0]["num_splats"] == 500


def test_generate_with_a_texture_writes_textured_meshes(tmp_path, sample_masks):
    from readers import Glb

    np.save(tmp_path / "masks.npy", sample_masks[:1])
    options = '{"texture": 256, "resolution": 32, "splats": 500}'
    result = generate(
        str(SAMPLE_IMAGE), "--masks", str(tmp_path / "masks.npy"), "--options", options,
        out=tmp_path / "out",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert (
        manifest["options"]["texture"] == 256 and manifest["objects"][0]["texture"]["size"] == 256
    )
    doc = Glb((tmp_path / "out/objects/0.glb").read_bytes()).doc
    assert "TEXCOORD_0" in doc["meshes"][0]["primitives"][0]["attributes"]
    assert doc["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"] == {"index": 0}
    bad = generate(str(SAMPLE_IMAGE), "--masks", str(tmp_path / "masks.npy"),
                   "--options", '{"texture": 100}', out=tmp_path / "bad")  # fmt: skip
    assert bad.returncode == 2 and "texture" in bad.stderr


def test_coco_file_picks_the_image_by_file_name_or_alone(tmp_path):
    coco = json.loads(SAMPLE_COCO.read_text())
    one = tmp_path / "renamed.json"
    coco["images"][0]["file_name"] = "some-other-name.jpg"
    one.write_text(json.dumps(coco))
    assert generate(str(SAMPLE_IMAGE), "--masks", str(one), out=tmp_path / "a").returncode == 0
    # Two images: the one named like IMAGE is chosen.
    coco["images"].append({"id": 2, "file_name": "shapes.jpg", "width": 640, "height": 480})
    coco["annotations"].append({**coco["annotations"][1], "id": 9, "image_id": 2})
    two = tmp_path / "two.json"
    two.write_text(json.dumps(coco))
    result = generate(str(SAMPLE_IMAGE), "--masks", str(two), out=tmp_path / "b")
    assert result.returncode == 0, result.stderr
    assert len(json.loads((tmp_path / "b/manifest.json").read_text())["objects"]) == 1
    result = generate(str(SAMPLE_IMAGE), "--masks", str(two), "--image-id", "1", out=tmp_path / "c")
    assert len(json.loads((tmp_path / "c/manifest.json").read_text())["objects"]) == 3


def _write_bad_files(tmp: Path) -> None:
    (tmp / "garbage.jpg").write_bytes(b"not an image at all")
    np.save(tmp / "small.npy", np.ones((10, 10), bool))
    np.save(tmp / "empty.npy", np.zeros((480, 640), bool))
    (tmp / "broken.json").write_text("{not json")


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    img, coco = str(SAMPLE_IMAGE), str(SAMPLE_COCO)
    return {
        "missing image": ([str(tmp / "nope.jpg"), "--masks", coco], ""),
        "garbage image": ([str(tmp / "garbage.jpg"), "--masks", coco], "invalid_image"),
        "size mismatch": ([img, "--masks", str(tmp / "small.npy")], "mask_size_mismatch"),
        "empty mask": ([img, "--masks", str(tmp / "empty.npy")], "empty_mask"),
        "broken json": ([img, "--masks", str(tmp / "broken.json")], "invalid_mask"),
        "missing masks file": ([img, "--masks", str(tmp / "nope.png")], ""),
        "unknown image id": ([img, "--masks", coco, "--image-id", "99"], "invalid_mask"),
        "unknown backend": ([img, "--masks", coco, "--backend", "nerf"], "unknown_backend"),
        "unknown option": ([img, "--masks", coco, "--options", '{"fov": 3}'], "invalid_option"),
        "option out of range": (
            [img, "--masks", coco, "--options", '{"fov_deg": 500}'],
            "invalid_option",
        ),
        "options not json": ([img, "--masks", coco, "--options", "{"], "--options"),
        "wrong mask format": ([img, "--masks", coco, "--mask-format", "rle"], "invalid_mask"),
    }


@pytest.mark.parametrize(
    "case",
    list(_bad_inputs(Path("."))),
)
def test_bad_input_exits_2_with_one_line(case, tmp_path):
    _write_bad_files(tmp_path)
    args, expected = _bad_inputs(tmp_path)[case]
    result = generate(*args, out=tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(("sam3d-jobs: error:", "sam3d-jobs generate: error:"))
    if "usage:" not in result.stderr:
        assert len(lines) == 1, result.stderr
    assert expected in lines[-1]
    assert not (tmp_path / "out" / "manifest.json").exists()
