"""The README's quick start runs as written: its shell block (the dev stack, submit, poll,
download) under bash, and its Python block against a running stack; only the port changes, to
a free one. The files they fetch are read back by the glTF reader. And the README stays short
and links only to guides that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from readers import Glb, validate_gltf

from jobs.redis_server import free_port
from sam3d_jobs.devstack import DevStack

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def block(after_heading: str, language: str) -> str:
    """The first ``language`` code block after the heading ``after_heading``."""
    section = README[README.index(after_heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block after {after_heading!r}"
    return match.group(1)


def workdir(tmp_path: Path) -> Path:
    """A folder that looks like the repository's root to the README's commands."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("samples", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def test_the_shell_quick_start_runs_as_written(tmp_path):
    port = str(free_port())
    script = block("## Submit, poll, download", "sh").replace("8000", port)
    data = tmp_path / "stack"
    script = script.replace("/tmp/sam3d-quickstart", str(data))
    cwd = workdir(tmp_path / "run")
    run = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        check=False,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    scene = cwd / "scene.glb"
    names = [n.get("name") for n in Glb(scene.read_bytes()).doc["nodes"]]
    assert sum(1 for n in names if n and n.startswith("object_")) == 3  # the sample's objects
    assert validate_gltf(scene)[str(scene)]["numErrors"] == 0


def test_the_python_quick_start_runs_as_written(tmp_path):
    code = block("## The same from Python", "python")
    stack = DevStack(tmp_path / "stack", api_workers=1)
    with stack:
        code = code.replace("http://127.0.0.1:8000", stack.url)
        cwd = workdir(tmp_path / "run")
        run = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
        )
    assert run.returncode == 0, run.stderr[-2000:]
    printed = run.stdout.splitlines()
    assert [line.split()[0] for line in printed] == ["0", "1", "2"]  # index, then its matrix
    assert Glb((cwd / "scene.glb").read_bytes()).doc["asset"]["version"] == "2.0"


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local and all((ROOT / link).exists() for link in local), [
        link for link in local if not (ROOT / link).exists()
    ]
    for guide in (ROOT / "docs").rglob("*.md"):
        text = guide.read_text(encoding="utf-8")
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in link or link.startswith("mailto:"):
                continue
            assert (guide.parent / link).exists(), f"{guide.relative_to(ROOT)} links {link}"
