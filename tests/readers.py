"""Independent readers for the tests: our own GLB parser (not trimesh, which writes the files),
plyfile for PLY, and the Khronos glTF validator run by Node."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
from plyfile import PlyData

JS_TOOLS = Path(__file__).parent / "js"
_COMPONENT = {5120: "i1", 5121: "u1", 5122: "i2", 5123: "u2", 5125: "u4", 5126: "f4"}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


class Glb:
    """A GLB file split into its JSON document and binary chunk."""

    def __init__(self, data: bytes) -> None:
        magic, version, length = struct.unpack_from("<4sII", data, 0)
        assert magic == b"glTF" and version == 2 and length == len(data)
        json_len, json_type = struct.unpack_from("<I4s", data, 12)
        assert json_type == b"JSON"
        self.doc = json.loads(data[20 : 20 + json_len])
        bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
        assert bin_type == b"BIN\x00"
        self.bin = data[28 + json_len : 28 + json_len + bin_len]

    def accessor(self, index: int) -> np.ndarray:
        acc = self.doc["accessors"][index]
        view = self.doc["bufferViews"][acc["bufferView"]]
        dtype = np.dtype("<" + _COMPONENT[acc["componentType"]])
        width = _WIDTH[acc["type"]]
        offset = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        stride = view.get("byteStride", dtype.itemsize * width)
        assert stride == dtype.itemsize * width, "interleaved buffers not expected"
        out = np.frombuffer(self.bin, dtype, acc["count"] * width, offset)
        return out.reshape(acc["count"], width) if width > 1 else out

    def mesh_arrays(self, mesh: int) -> dict[str, np.ndarray]:
        (prim,) = self.doc["meshes"][mesh]["primitives"]
        arrays = {name: self.accessor(i) for name, i in prim["attributes"].items()}
        arrays["indices"] = self.accessor(prim["indices"]).reshape(-1, 3)
        return arrays

    def world_matrices(self) -> dict[str, np.ndarray]:
        """Each named node's node-to-world matrix (column vectors), walking from the scene roots."""
        nodes, out = self.doc["nodes"], {}

        def local(node: dict) -> np.ndarray:
            if "matrix" in node:
                return np.array(node["matrix"], dtype=np.float64).reshape(4, 4).T  # column-major
            m = np.eye(4)
            assert "rotation" not in node and "scale" not in node, "TRS nodes not expected"
            m[:3, 3] = node.get("translation", [0, 0, 0])
            return m

        def walk(index: int, parent: np.ndarray) -> None:
            node = nodes[index]
            world = parent @ local(node)
            out[node.get("name", str(index))] = (world, node.get("mesh"))
            for child in node.get("children", []):
                walk(child, world)

        for root in self.doc["scenes"][self.doc.get("scene", 0)]["nodes"]:
            walk(root, np.eye(4))
        return out


def read_ply(path_or_bytes) -> tuple[list[str], np.ndarray, str]:
    """(property names, (N, P) float32 table, format) read with plyfile."""
    if isinstance(path_or_bytes, bytes | bytearray):
        import io

        ply = PlyData.read(io.BytesIO(path_or_bytes))
    else:
        ply = PlyData.read(str(path_or_bytes))
    vertex = ply["vertex"]
    names = [p.name for p in vertex.properties]
    table = np.stack([np.asarray(vertex[n], dtype=np.float32) for n in names], 1)
    return names, table, ply.header.splitlines()[1]


def validate_gltf(*paths: Path) -> dict[str, dict]:
    """Khronos glTF validator reports keyed by path."""
    result = subprocess.run(
        ["node", str(JS_TOOLS / "validate_gltf.mjs"), *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout)
