"""Meshes as binary glTF through trimesh, with vertex colours."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import trimesh

from worker.backends.base import Mesh

CONTENT_TYPE = "model/gltf-binary"


def srgb_to_linear(colors: np.ndarray) -> np.ndarray:
    """RGBA uint8, sRGB-encoded RGB -> RGBA uint8 with linear RGB (alpha unchanged)."""
    c = colors[..., :3].astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    out = colors.copy()
    out[..., :3] = np.round(linear * 255.0).astype(np.uint8)
    return out


def _trimesh(mesh: Mesh) -> trimesh.Trimesh:
    # glTF defines COLOR_0 as linear; our colours come from the photo, which is sRGB.
    return trimesh.Trimesh(
        vertices=mesh.vertices,
        faces=mesh.faces,
        vertex_colors=srgb_to_linear(mesh.colors),
        process=False,
    )


def export_mesh_glb(mesh: Mesh) -> bytes:
    """One object in its local frame."""
    return trimesh.Scene(_trimesh(mesh)).export(file_type="glb", include_normals=True)


def export_scene_glb(meshes: Sequence[Mesh], matrices: Sequence[np.ndarray]) -> bytes:
    """All objects: node ``object_{i}`` carries matrix i, its mesh stays in local coordinates."""
    scene = trimesh.Scene()
    for i, (mesh, matrix) in enumerate(zip(meshes, matrices, strict=True)):
        scene.add_geometry(
            _trimesh(mesh),
            node_name=f"object_{i}",
            geom_name=f"object_{i}_mesh",
            transform=np.asarray(matrix, dtype=np.float64),
        )
    return scene.export(file_type="glb", include_normals=True)
