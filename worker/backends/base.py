"""The generator interface: ``setup()`` once per process, ``generate()`` once per object.

A backend may also offer ``generate_many(image, masks, *, camera, seeds, options)``, an
iterator of ``ObjectResult`` in mask order (it may batch objects on the GPU); ``iter_objects``
uses it when present, so the pipeline consumes objects one by one either way.

A backend that can batch objects of *different jobs* (different images) offers
``batch_key(options)`` (jobs whose keys are equal may share passes; None: this job may not)
and ``generate_batch(items, *, options, leaving)``: an iterator of ``(item key, position in
the item's masks, ObjectResult)`` as objects come, in any order across items. ``leaving()``
names the items that must leave the batch (canceled, out of time); the backend calls it at
each step it can stop at and yields nothing more for them (worker/batching.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from jobs.frames import Camera, Pose

# The zeroth spherical-harmonic basis: how 3DGS stores a colour, f_dc = (rgb - 0.5) / SH_C0.
# Here, beside ``Gaussians``, because backends decode it and the exporters encode it.
SH_C0 = 0.28209479177387814


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in the object's local frame (glTF axes, centred, unit cube)."""

    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int32, counter-clockwise seen from outside
    colors: np.ndarray  # (V, 4) uint8 RGBA vertex colours


@dataclass(frozen=True)
class Gaussians:
    """3D Gaussians in the object's local frame, in linear (not log/logit) units."""

    positions: np.ndarray  # (N, 3) float32
    rotations: np.ndarray  # (N, 4) float32 unit quaternions w,x,y,z
    scales: np.ndarray  # (N, 3) float32 standard deviations along the rotated axes
    opacities: np.ndarray  # (N,) float32 in (0, 1)
    colors: np.ndarray  # (N, 3) float32 RGB in [0, 1]

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class ObjectResult:
    """What a backend makes of one masked object."""

    mesh: Mesh
    gaussians: Gaussians
    pose: Pose
    # The camera the pose refers to, for backends that estimate it per image (SAM 3D's depth
    # model); None when the backend's camera() already gave it.
    camera: Camera | None = None
    # What the surface looks like, for baking a texture (``texture`` option): points and
    # normals in the local frame -> sRGB colours in [0, 1] (worker/assets/texture.py). None:
    # the object's own Gaussians are its appearance.
    appearance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


Progress = Callable[[str], None]


@dataclass(frozen=True)
class BatchItem:
    """One job's share of a cross-job batch (``generate_batch``): its image, the masks still
    to generate and their seeds, its camera (None: the backend estimates it) and depth."""

    key: str
    image: np.ndarray
    masks: Sequence[np.ndarray]
    seeds: Sequence[int]
    camera: Camera | None = None
    depth: Any = None


class Backend(Protocol):
    """A generator of 3D objects from an image and one mask."""

    name: str
    version: str

    def setup(self) -> None:
        """Load weights and warm up; called once per worker process."""

    def camera(self, image: np.ndarray, options: Mapping[str, Any]) -> Camera | None:
        """The pinhole camera all objects of this image are posed against, or None when
        only generating reveals it (then the first object's ``ObjectResult.camera``)."""

    def generate(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        *,
        camera: Camera,
        seed: int,
        options: Mapping[str, Any],
    ) -> ObjectResult:
        """One object from an (H,W,3) uint8 image and an (H,W) bool mask."""


def iter_objects(
    backend: Backend,
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    *,
    camera: Camera | None,
    seeds: Sequence[int],
    options: Mapping[str, Any],
    **extra: Any,
) -> Iterator[tuple[int, ObjectResult]]:
    """``(position in masks, result)`` for every mask, in order, as each is generated.

    Uses ``backend.generate_many`` when the backend has it (results may then come in
    chunks), else one ``backend.generate`` per mask; ``extra`` (``depth=``) goes to both.
    Without a camera, the first result's camera is passed to the objects after it.
    """
    if len(seeds) != len(masks):
        raise ValueError(f"{len(seeds)} seeds for {len(masks)} masks")
    many = getattr(backend, "generate_many", None)
    if many is not None:
        results = many(image, masks, camera=camera, seeds=list(seeds), options=options, **extra)
        count = 0
        for count, result in enumerate(results, 1):
            if count > len(masks):
                raise RuntimeError(f"{backend.name}.generate_many yielded more than {len(masks)}")
            yield count - 1, result
        if count != len(masks):
            raise RuntimeError(
                f"{backend.name}.generate_many yielded {count} results for {len(masks)} masks"
            )
        return
    for i in range(len(masks)):
        result = backend.generate(
            image, masks[i], camera=camera, seed=seeds[i], options=options, **extra
        )
        camera = camera or result.camera
        yield i, result
