"""Gaussian splats as SPZ (Niantic's compressed splat format), version 2, written from the
published format description (github.com/nianticlabs/spz, MIT).

An SPZ file is one gzip stream holding a 16-byte header and then each attribute for every
splat, attribute after attribute: positions (24-bit fixed point), alphas (8-bit, sigmoid),
colours (8-bit SH DC), scales (8-bit log), rotations (8-bit x, y, z with w >= 0 implied).
SPZ's axes are right-up-back, the same as glTF's: our arrays go in unchanged. About a tenth
of the PLY's size, lossy (positions to 1/4096 of a unit at the default fractional bits).
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Callable, Iterable
from typing import BinaryIO

import numpy as np

from worker.backends.base import SH_C0, Gaussians

CONTENT_TYPE = "application/octet-stream"
MAGIC = 0x5053474E  # "NGSP" little-endian
VERSION = 2
FRACTIONAL_BITS = 12
COLOR_SCALE = 0.15  # SPZ's scale of the SH DC coefficient in its 8-bit colours
_HEADER = struct.Struct("<IIIBBBB")  # magic, version, count, sh degree, fractional bits, flags, 0
_MAX_POSITION = (2**23 - 1) / 2**FRACTIONAL_BITS  # 24-bit signed fixed point: +-2048 units


def _u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def encode_positions(positions: np.ndarray) -> bytes:
    """(N, 3) float -> N*9 bytes: 24-bit little-endian two's complement fixed point."""
    p = np.asarray(positions, dtype=np.float64)
    if len(p) and np.abs(p).max() > _MAX_POSITION:
        raise ValueError(f"SPZ positions must lie within +-{_MAX_POSITION:.0f} units")
    fixed = np.round(p * (1 << FRACTIONAL_BITS)).astype(np.int32).reshape(-1)
    raw = fixed.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
    return np.ascontiguousarray(raw).tobytes()


def encode_alphas(opacities: np.ndarray) -> bytes:
    """Opacity in [0, 1] -> 8 bits (SPZ stores sigmoid(logit) * 255, i.e. the opacity)."""
    return _u8(np.asarray(opacities, dtype=np.float32) * 255.0).tobytes()


def encode_colors(colors: np.ndarray) -> bytes:
    """RGB in [0, 1] -> SH DC coefficient f_dc, stored as f_dc * 0.15 * 255 + 127.5."""
    f_dc = (np.asarray(colors, dtype=np.float32) - 0.5) / SH_C0
    return _u8(f_dc * (COLOR_SCALE * 255.0) + 127.5).reshape(-1).tobytes()


def encode_scales(scales: np.ndarray) -> bytes:
    """Linear scales -> (log(scale) + 10) * 16 in 8 bits."""
    logs = np.log(np.maximum(np.asarray(scales, dtype=np.float32), 1e-30))
    return _u8((logs + 10.0) * 16.0).reshape(-1).tobytes()


def encode_rotations(rotations: np.ndarray) -> bytes:
    """Quaternions w,x,y,z -> x, y, z of the unit quaternion with w >= 0, in 8 bits each."""
    q = np.asarray(rotations, dtype=np.float32)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    q = np.where(norm > 0, q / np.where(norm > 0, norm, 1), np.array([1, 0, 0, 0], "f4"))
    q = q * np.where(q[:, :1] < 0, -1.0, 1.0)
    return _u8(q[:, 1:4] * 127.5 + 127.5).reshape(-1).tobytes()


ENCODERS: tuple[tuple[str, Callable[[np.ndarray], bytes]], ...] = (
    ("positions", encode_positions),
    ("opacities", encode_alphas),
    ("colors", encode_colors),
    ("scales", encode_scales),
    ("rotations", encode_rotations),
)


def header(count: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, int(count), 0, FRACTIONAL_BITS, 0, 0)


def write_splat_spz(
    out: BinaryIO, count: int, parts: Callable[[], Iterable[Gaussians]], level: int = 6
) -> None:
    """Stream an SPZ of ``count`` splats to ``out``; ``parts()`` yields the splats in pieces
    and is called once per attribute (SPZ is attribute-major), so only one piece is in memory
    at a time."""
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as gz:
        gz.write(header(count))
        for field, encode in ENCODERS:
            written = 0
            for g in parts():
                gz.write(encode(getattr(g, field)))
                written += len(g)
            if written != count:
                raise ValueError(f"SPZ {field}: {written} splats given, header says {count}")


def export_splat_spz(gaussians: Gaussians) -> bytes:
    """SPZ bytes of ``gaussians`` (positions and orientations as given: glTF axes)."""
    buf = io.BytesIO()
    write_splat_spz(buf, len(gaussians), lambda: [gaussians])
    return buf.getvalue()


def read_splat_spz(data: bytes) -> Gaussians:
    """Inverse of ``export_splat_spz`` for SPZ version 2 and 3 files without higher SH."""
    raw = gzip.decompress(data)
    magic, version, n, sh_degree, frac, _, _ = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC or version not in (2, 3):
        raise ValueError("not an SPZ version 2 or 3 file")
    body = np.frombuffer(raw, np.uint8, offset=_HEADER.size)
    pos = body[: n * 9].reshape(n * 3, 3).astype(np.int32)
    fixed = pos[:, 0] | (pos[:, 1] << 8) | (pos[:, 2] << 16)
    fixed = np.where(fixed & 0x800000, fixed - (1 << 24), fixed)
    at = n * 9
    positions = (fixed / float(1 << frac)).reshape(n, 3).astype(np.float32)
    alphas = body[at : at + n] / 255.0
    at += n
    colors = (body[at : at + 3 * n].reshape(n, 3) / 255.0 - 0.5) / COLOR_SCALE * SH_C0 + 0.5
    at += 3 * n
    scales = np.exp(body[at : at + 3 * n].reshape(n, 3) / 16.0 - 10.0)
    at += 3 * n
    if version == 2:
        xyz = body[at : at + 3 * n].reshape(n, 3) / 127.5 - 1.0
        w = np.sqrt(np.maximum(0.0, 1.0 - (xyz**2).sum(axis=1)))
        rotations = np.column_stack([w, xyz])
    else:
        raise ValueError("SPZ version 3 rotations are not read here")
    return Gaussians(
        positions=positions,
        rotations=(rotations / np.linalg.norm(rotations, axis=1, keepdims=True)).astype("f4"),
        scales=scales.astype("f4"),
        opacities=alphas.astype("f4"),
        colors=colors.astype("f4"),
    )
