"""Mesh control: decimation to a face budget (fast-simplification, colours kept) and GLB
compression (meshopt or Draco, by the glTF Transform CLI, which writes the extensions the file
then needs into ``extensionsUsed``/``extensionsRequired``)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from worker.backends.base import Mesh

GLTF_TRANSFORM = (
    Path(__file__).resolve().parents[1] / "js" / "node_modules" / ".bin" / "gltf-transform"
)
COMPRESSION_EXTENSIONS = {
    "meshopt": "EXT_meshopt_compression",
    "draco": "KHR_draco_mesh_compression",
}


def decimate(mesh: Mesh, target_faces: int | None) -> Mesh:
    """``mesh`` with at most ``target_faces`` faces (quadric decimation); each kept vertex
    gets the mean colour of the original vertices nearest it. Unchanged when already small.

    The colours come from a k-d tree queried on every core, not from replaying the
    library's collapses: for a 1M-face mesh to 200k that replay took 1.4 s, half of it
    holding the GIL that the GPU worker's generating thread needs (bench/texture.py's
    "beside Python" measure); the tree takes 0.26 s, about half of it without the GIL.
    The simplification itself (0.6-0.9 s there) holds the GIL throughout."""
    faces = np.asarray(mesh.faces)
    if target_faces is None or len(faces) <= target_faces:
        return mesh
    import fast_simplification
    from scipy.spatial import cKDTree

    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    reduction = 1.0 - target_faces / len(faces)
    out_vertices, out_faces = vertices, faces
    for _ in range(4):  # the library lands near, not always under, the target: tighten
        out_vertices, out_faces = fast_simplification.simplify(
            vertices, faces, target_reduction=reduction
        )
        if len(out_faces) <= target_faces:
            break
        reduction = min(0.999, reduction + (len(out_faces) - target_faces) / len(faces) + 1e-3)
    if len(out_faces) > target_faces:  # still over: keep the largest faces
        out_faces = out_faces[:target_faces]
    count = len(out_vertices)
    _, nearest = cKDTree(out_vertices).query(vertices, workers=-1)
    colors = np.asarray(mesh.colors, dtype=np.float64)
    weight = np.bincount(nearest, minlength=count)
    sums = np.stack(
        [
            np.bincount(nearest, weights=colors[:, c], minlength=count)
            for c in range(colors.shape[1])
        ],
        axis=1,
    )
    lone = weight == 0  # no original vertex nearer to it than to another: its nearest one's
    if lone.any():
        _, own = cKDTree(vertices).query(out_vertices[lone], workers=-1)
        sums[lone], weight[lone] = colors[own], 1
    new_colors = np.round(sums / weight[:, None]).astype(np.uint8)
    return Mesh(
        vertices=np.ascontiguousarray(out_vertices, dtype=np.float32),
        faces=np.ascontiguousarray(out_faces, dtype=np.int32),
        colors=new_colors,
    )


def compression_available() -> bool:
    """True when the glTF Transform CLI and Node.js are installed (``make install``)."""
    return GLTF_TRANSFORM.exists() and shutil.which("node") is not None


def compress_glb_file(src: Path, dst: Path, method: str) -> None:
    """Compress every mesh of the GLB ``src`` into ``dst`` with ``method`` (meshopt, draco)."""
    if method not in COMPRESSION_EXTENSIONS:
        raise ValueError(f"unknown mesh compression {method!r}")
    if not compression_available():
        raise RuntimeError(
            "mesh compression needs Node.js and the glTF Transform CLI: run make install"
        )
    subprocess.run(
        [str(GLTF_TRANSFORM), method, str(src), str(dst)],
        check=True,
        capture_output=True,
        timeout=600,
    )


def compress_glb(data: bytes, method: str) -> bytes:
    """``compress_glb_file`` on bytes; ``method`` "none" returns ``data`` as it is."""
    if method == "none":
        return data
    with tempfile.TemporaryDirectory(prefix="sam3d-compress-") as tmp:
        src, dst = Path(tmp) / "in.glb", Path(tmp) / "out.glb"
        src.write_bytes(data)
        compress_glb_file(src, dst, method)
        return dst.read_bytes()
