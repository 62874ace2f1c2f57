"""One GLB with the mesh and the splats: the splats as a ``KHR_gaussian_splatting`` POINTS
primitive beside the mesh's triangles, in the same node (so the same frame).

Attributes per the extension (ellipse kernel): POSITION, ``KHR_gaussian_splatting:ROTATION``
(unit quaternion x, y, z, w), ``:SCALE`` (linear standard deviations), ``:OPACITY`` (0..1),
``:SH_DEGREE_0_COEF_0`` (the SH DC term, as PLY's f_dc), plus COLOR_0 (linear RGBA) so a
viewer without the extension still draws a coloured point cloud.
"""

from __future__ import annotations

import numpy as np

from worker.assets import glb
from worker.backends.base import SH_C0, Gaussians

EXTENSION = "KHR_gaussian_splatting"
ATTR = EXTENSION + ":"
_FLOAT, _UBYTE = 5126, 5121
_ARRAY_BUFFER = 34962


def splat_primitive_arrays(gaussians: Gaussians) -> list[tuple[str, np.ndarray, dict]]:
    """(attribute, little-endian array, accessor fields) of every attribute of the primitive."""
    rotations = np.asarray(gaussians.rotations, dtype="<f4")
    norm = np.linalg.norm(rotations, axis=1, keepdims=True)
    rotations = rotations / np.where(norm > 0, norm, 1)
    colors = np.asarray(gaussians.colors, dtype=np.float32)
    rgba = np.empty((len(gaussians), 4), dtype=np.uint8)
    rgba[:, :3] = np.clip(np.round(colors * 255), 0, 255)
    rgba[:, 3] = np.clip(np.round(np.asarray(gaussians.opacities) * 255), 0, 255)
    vec3, vec4, scalar = {"type": "VEC3"}, {"type": "VEC4"}, {"type": "SCALAR"}
    return [
        ("POSITION", np.asarray(gaussians.positions, dtype="<f4"), vec3),
        ("COLOR_0", glb.srgb_to_linear(rgba), {**vec4, "normalized": True}),
        (ATTR + "ROTATION", np.ascontiguousarray(rotations[:, [1, 2, 3, 0]], "<f4"), vec4),
        (ATTR + "SCALE", np.asarray(gaussians.scales, dtype="<f4"), vec3),
        (ATTR + "OPACITY", np.asarray(gaussians.opacities, dtype="<f4"), scalar),
        (ATTR + "SH_DEGREE_0_COEF_0", ((colors - 0.5) / SH_C0).astype("<f4"), vec3),
    ]


def add_splats(doc: dict, binary: bytes | memoryview, gaussians: Gaussians) -> bytes:
    """A GLB: the document ``doc`` (one mesh, its buffer ``binary``) with the splats added to
    its first mesh as a POINTS primitive."""
    doc = {
        **doc,
        "meshes": [dict(m) for m in doc["meshes"]],
        "accessors": list(doc.get("accessors", [])),
        "bufferViews": list(doc.get("bufferViews", [])),
    }
    blobs: list[bytes | memoryview] = [binary, b"\0" * (-len(binary) % 4)]
    offset = len(binary) + (-len(binary) % 4)
    attributes = {}
    for name, array, fields in splat_primitive_arrays(gaussians):
        data = np.ascontiguousarray(array).tobytes()
        doc["bufferViews"].append(
            {"buffer": 0, "byteOffset": offset, "byteLength": len(data), "target": _ARRAY_BUFFER}
        )
        component = _UBYTE if array.dtype == np.uint8 else _FLOAT
        accessor = {
            "bufferView": len(doc["bufferViews"]) - 1,
            "componentType": component,
            "count": len(gaussians),
            **fields,
        }
        if name == "POSITION" and len(gaussians):
            accessor["min"] = [float(x) for x in array.min(axis=0)]
            accessor["max"] = [float(x) for x in array.max(axis=0)]
        attributes[name] = len(doc["accessors"])
        doc["accessors"].append(accessor)
        blobs += [data, b"\0" * (-len(data) % 4)]
        offset += len(data) + (-len(data) % 4)
    mesh = doc["meshes"][0]
    mesh["primitives"] = [
        *mesh["primitives"],
        {
            "attributes": attributes,
            "mode": 0,
            "extensions": {
                EXTENSION: {
                    "kernel": "ellipse",
                    "colorSpace": "srgb_rec709_display",
                    "projection": "perspective",
                    "sortingMethod": "cameraDistance",
                }
            },
        },
    ]
    doc["buffers"] = [{"byteLength": offset}]
    doc["extensionsUsed"] = sorted({*doc.get("extensionsUsed", []), EXTENSION})
    return glb.glb_bytes(doc, blobs)


def export_splats_glb(mesh_glb: bytes, gaussians: Gaussians) -> bytes:
    """The object's mesh GLB (uncompressed) with its splats beside the mesh."""
    doc, binary = glb.read_glb(mesh_glb)
    return add_splats(doc, binary, gaussians)
