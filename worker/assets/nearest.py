"""The k nearest of a point set for many query points, on a torch device (the GPU worker's
card): a uniform grid, exact.

Points are sorted by grid cell; each query reads the points of the 27 cells around its own.
Whatever lies within one cell edge of a query is among them, so a query whose k-th nearest
candidate is that close has its exact answer. The few others (a query far from the set, or
in a sparse part of it) are asked again with a grid twice as coarse, until every query is
answered. The cell edge starts at the one that puts about ``per_cell`` points in an occupied
cell, measured on the set itself (SAM 3D's Gaussians are 32 per voxel of a 64^3 grid, on a
surface: 8 per cell answered every query on such a set in the first pass, 16 took 7x longer,
4 left 0.3 % for a second). Work runs in chunks of queries of at most ``budget`` candidates.

The CPU route (``scipy.spatial.cKDTree``) answers the same question; tests compare the two.
"""

from __future__ import annotations

import math

import numpy as np


class Clustered(ValueError):
    """The set is too unevenly spread for a uniform grid."""


_OFFSETS = [(x, y, z) for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1)]


def nearest(
    points: np.ndarray,
    queries: np.ndarray,
    k: int,
    device: str,
    *,
    per_cell: int = 8,
    budget: int = 1 << 24,
    max_candidates: int = 1 << 31,
) -> tuple[np.ndarray, np.ndarray]:
    """(distances (M, k) float32, indices (M, k) int64) of each query's ``k`` nearest
    ``points``, nearest first (``k`` at most ``len(points)``). ``Clustered`` where a pass
    would read more than ``max_candidates`` (most points in a few cells: a k-d tree is the
    tool for that set; 430k texels over 640k Gaussians on a surface read about 3.4e8)."""
    import torch

    if not 0 < k <= len(points):
        raise ValueError(f"k={k} for {len(points)} points")
    with torch.no_grad():
        pts = torch.as_tensor(np.asarray(points, np.float32), device=device)
        qs = torch.as_tensor(np.asarray(queries, np.float32), device=device)
        dist = torch.full((len(qs), k), math.inf, device=device)
        index = torch.zeros((len(qs), k), dtype=torch.int64, device=device)
        left = torch.arange(len(qs), device=device)
        cell = _starting_cell(pts, per_cell)
        while len(left):
            grid = _Grid(pts, cell)
            if 27 * grid.widest * len(left) > max_candidates:
                raise Clustered(
                    f"{grid.widest} of {len(pts)} points in one cell for {len(left)} queries"
                )
            done = []
            for chunk in torch.split(left, max(1, budget // (27 * grid.widest))):
                d, i = grid.nearest(qs[chunk], k)
                dist[chunk], index[chunk] = d, i
                done.append(d[:, -1] <= cell)  # the k-th lies within one cell: exact
            left = left[~torch.cat(done)]
            cell *= 2
        return dist.cpu().numpy(), index.cpu().numpy()


def _starting_cell(pts, per_cell: int) -> float:
    """A cell edge giving about ``per_cell`` points per occupied cell (points on a surface
    fill few cells: the edge is measured by counting occupied cells, not from the volume)."""
    import torch

    extent = float((pts.max(0).values - pts.min(0).values).max().clamp(min=1e-6))
    cell = extent / 64
    for _ in range(12):
        occupied = len(torch.unique(_Grid(pts, cell, sort=False).keys))
        mean = len(pts) / max(occupied, 1)
        if 0.5 * per_cell <= mean <= 2 * per_cell or cell >= extent:
            break
        cell = min(cell * (per_cell / mean) ** 0.5, extent)  # on a surface: count ~ edge^2
    return cell


class _Grid:
    """Points sorted by cell; each occupied cell's key, first row and count."""

    def __init__(self, pts, cell: float, sort: bool = True) -> None:
        import torch

        self.pts, self.cell = pts, cell
        self.low = pts.min(0).values
        coords = torch.floor((pts - self.low) / cell).to(torch.int64) + 2
        self.dims = (coords.max(0).values + 3).tolist()  # room for -2 .. max + 2
        self.keys = keys = self._key(coords)
        if not sort:  # the keys alone (``_starting_cell``)
            return
        keys, self.order = torch.sort(keys)
        self.keys, counts = torch.unique_consecutive(keys, return_counts=True)
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts = counts
        self.widest = int(counts.max())
        self.offsets = torch.tensor(_OFFSETS, device=pts.device)

    def _key(self, coords):
        _, ny, nz = self.dims
        return (coords[..., 0] * ny + coords[..., 1]) * nz + coords[..., 2]

    def nearest(self, queries, k: int):
        import torch

        coords = torch.floor((queries - self.low) / self.cell).to(torch.int64) + 2
        upper = torch.tensor(self.dims, device=coords.device) - 2
        coords = torch.minimum(coords.clamp(min=1), upper)  # outside: the border cells
        keys = self._key(coords[:, None, :] + self.offsets)  # (m, 27)
        at = torch.searchsorted(self.keys, keys).clamp(max=len(self.keys) - 1)
        count = torch.where(self.keys[at] == keys, self.counts[at], 0)
        step = torch.arange(self.widest, device=coords.device)
        rows = self.starts[at][..., None] + step  # (m, 27, widest)
        valid = step < count[..., None]
        candidate = self.order[torch.where(valid, rows, 0)].reshape(len(queries), -1)
        gap = self.pts[candidate] - queries[:, None, :]
        d2 = (gap * gap).sum(-1).masked_fill(~valid.reshape(len(queries), -1), math.inf)
        if d2.shape[1] < k:  # fewer candidates than k: the rest stay unanswered (infinite)
            pad = k - d2.shape[1]
            d2 = torch.nn.functional.pad(d2, (0, pad), value=math.inf)
            candidate = torch.nn.functional.pad(candidate, (0, pad))
        d2, pick = torch.topk(d2, k, dim=1, largest=False)
        return d2.sqrt(), torch.gather(candidate, 1, pick)
