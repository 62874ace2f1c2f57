"""Gaussian splats as the standard INRIA 3DGS PLY (binary little-endian float32)."""

from __future__ import annotations

import numpy as np

from worker.backends.base import SH_C0, Gaussians

CONTENT_TYPE = "application/octet-stream"
PROPERTIES = (
    "x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3"
).split()
_EPS = np.float32(1e-7)


def ply_header(count: int) -> bytes:
    """The header of a 3DGS PLY of ``count`` splats (the rows follow it)."""
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {count}"]
    lines += [f"property float {name}" for name in PROPERTIES]
    return ("\n".join([*lines, "end_header"]) + "\n").encode("ascii")


# Columns of a row (PROPERTIES): what a transform of the rows changes.
POSITION_COLUMNS, SCALE_COLUMNS, ROTATION_COLUMNS = slice(0, 3), slice(10, 13), slice(13, 17)


def splat_rows(gaussians: Gaussians) -> np.ndarray:
    """The (N, 17) float32 rows of a 3DGS PLY body, computed in float32."""
    n = len(gaussians)
    flat = np.empty((n, len(PROPERTIES)), dtype="<f4")
    flat[:, 0:3] = gaussians.positions
    flat[:, 3:6] = 0.0
    flat[:, 6:9] = gaussians.colors
    flat[:, 6:9] -= np.float32(0.5)
    flat[:, 6:9] /= np.float32(SH_C0)
    opacity = np.clip(np.asarray(gaussians.opacities, dtype=np.float32), _EPS, 1 - _EPS)
    flat[:, 9] = np.log(opacity / (np.float32(1) - opacity))
    flat[:, 10:13] = np.log(np.maximum(np.asarray(gaussians.scales, dtype=np.float32), _EPS))
    flat[:, 13:17] = gaussians.rotations
    return flat


def export_splat_ply(gaussians: Gaussians) -> bytes:
    """PLY bytes: opacity as a logit, scales as logs, rotation w,x,y,z, colour as SH DC."""
    return ply_from_rows(splat_rows(gaussians))


def ply_from_rows(rows: np.ndarray) -> bytes:
    """PLY bytes of (N, 17) rows from ``splat_rows``: the body copied once."""
    header = ply_header(len(rows))
    out = bytearray(len(header) + rows.nbytes)
    out[: len(header)] = header
    memoryview(out)[len(header) :] = memoryview(np.ascontiguousarray(rows, dtype="<f4")).cast("B")
    return bytes(out)


def gaussians_from_rows(rows: np.ndarray) -> Gaussians:
    """Inverse of ``splat_rows``: the (N, 17) rows of our PLY layout back to Gaussians."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, len(PROPERTIES))
    return Gaussians(
        positions=rows[:, 0:3],
        rotations=rows[:, 13:17],
        scales=np.exp(rows[:, 10:13]),
        opacities=1 / (1 + np.exp(-rows[:, 9])),
        colors=rows[:, 6:9] * np.float32(SH_C0) + np.float32(0.5),
    )


def read_splat_ply(data: bytes) -> Gaussians:
    """Inverse of ``export_splat_ply``; reads any float32 3DGS PLY (extra properties ignored).

    Parses the header and maps the body with ``numpy.frombuffer``: plyfile reading from a
    stream is orders of magnitude slower on large files.
    """
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError("not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in header:
        raise ValueError("only binary little-endian PLY is supported")
    count, names = 0, []
    for line in header:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["property"]:
            if parts[1] != "float":
                raise ValueError(f"unsupported property type {parts[1]}")
            names.append(parts[2])
    body = np.frombuffer(data, "<f4", count * len(names), end + len("end_header\n"))
    table = body.reshape(count, len(names))
    col = {name: i for i, name in enumerate(names)}

    def cols(*keys: str) -> np.ndarray:
        return table[:, [col[k] for k in keys]]

    rotations = cols("rot_0", "rot_1", "rot_2", "rot_3")
    return Gaussians(
        positions=cols("x", "y", "z").copy(),
        rotations=(rotations / np.linalg.norm(rotations, axis=1, keepdims=True)).astype("f4"),
        scales=np.exp(cols("scale_0", "scale_1", "scale_2")),
        opacities=(1 / (1 + np.exp(-table[:, col["opacity"]]))).astype("f4"),
        colors=(cols("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5).astype("f4"),
    )
