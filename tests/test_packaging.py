"""Distributions: the SDK installs alone, with nothing of the server, and no distribution puts
a generic top-level name (api, jobs, worker, client) into site-packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from sam3d_client import inputs as sdk_inputs
from sam3d_client.rle import encode_masks_rle

from jobs.masks import MASK_FORMATS

ROOT = Path(__file__).resolve().parents[1]
GENERIC = {"api", "jobs", "worker", "client", "tests", "bench", "scripts"}


def _wheel(project: Path, files: list[str], out: Path) -> Path:
    """The wheel of ``project``, built from a copy of ``files`` (setuptools writes build/ and
    egg-info next to the sources: not in the checkout)."""
    source = out / "src"
    source.mkdir()
    for name in files:
        copy = shutil.copytree if (project / name).is_dir() else shutil.copy2
        copy(project / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def _top_level(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return {name.split("/")[0] for name in z.namelist()}


@pytest.fixture(scope="module")
def sdk_wheel(tmp_path_factory) -> Path:
    return _wheel(
        ROOT / "sdk", ["pyproject.toml", "README.md", "sam3d_client"], tmp_path_factory.mktemp("w")
    )


def test_sdk_installs_alone_in_a_fresh_venv(sdk_wheel, tmp_path):
    assert _top_level(sdk_wheel) == {"sam3d_client", "sam3d_client-0.1.0.dist-info"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Offline, no index: the SDK declares no dependency, so nothing else can come in.
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", str(sdk_wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    installed = {p.name.split("-")[0].split(".")[0] for p in Path(site).iterdir()}
    assert "sam3d_client" in installed
    assert not installed & GENERIC, installed & GENERIC
    # Paths, bytes and JSON masks need neither numpy nor Pillow; nothing of the server loads.
    (tmp_path / "m.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    check = f"""
import sys
import sam3d_client
from sam3d_client import Client, ServiceError
from sam3d_client.inputs import encode_masks, encode_image
from sam3d_client.cli import build_parser
payload = encode_masks([[1, 2, 30, 2, 30, 40]], image=b"")
assert payload.mask_input == [[1, 2, 30, 2, 30, 40]]
assert encode_masks({str(tmp_path / "m.png")!r}, image=b"").files
assert encode_image(b"\\xff\\xd8\\xff rest")[0] == "image.jpg"
Client("http://127.0.0.1:9")
build_parser().parse_args(["submit", "x.jpg", "--masks", "m.json", "--server", "http://h"])
for name in ("flask", "celery", "boto3", "redis", "numpy", "PIL", "jobs", "api", "worker"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{{name}} is importable in the SDK's venv")
loaded = {{m.split(".")[0] for m in sys.modules}}
assert not loaded & {{"numpy", "PIL", "jobs", "api", "worker"}}, loaded
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Run outside the checkout, whose folders would be importable from the current directory.
    result = subprocess.run(
        [python, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_server_distribution_installs_one_unique_name(tmp_path):
    wheel = _wheel(ROOT, ["pyproject.toml", "README.md", "sam3d_jobs"], tmp_path)
    assert _top_level(wheel) == {"sam3d_jobs", "sam3d_jobs-0.1.0.dist-info"}


def test_sdk_mask_formats_are_the_services():
    assert sdk_inputs.MASK_FORMATS == MASK_FORMATS


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (3, 300)])
def test_sdk_rle_is_byte_for_byte_pycocotools(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    masks = [
        np.zeros(shape, bool),
        np.ones(shape, bool),
        rng.random(shape) > 0.5,
        rng.random(shape) > 0.97,
    ]
    for mask in masks:
        ours = encode_masks_rle(mask)[0]
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours == {"size": list(shape), "counts": theirs["counts"].decode()}
        assert np.array_equal(coco_mask.decode({**ours, "counts": ours["counts"]}), mask)
