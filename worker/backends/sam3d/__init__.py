"""``sam3d``: Meta's SAM 3D Objects as a backend. Importing the package imports neither torch
nor upstream; the heavy modules load in ``Sam3dBackend.setup``.

| module | what it is |
|---|---|
| ``backend`` | ``Sam3dBackend``: setup, ``generate`` (upstream's ``run()``), ``generate_many`` |
| ``preflight`` | what is checked before loading: checkpoint files, packages, the GPU |
| ``upstream`` | importing upstream with the chosen attention, its config, building the pipeline |
| ``surface`` | every upstream name the backend uses, checked at setup; the fast paths' state |
| ``convert`` | upstream's outputs in our frames: Gaussians, mesh, pose, camera |
| ``flow`` | the batched flow: every object of an image through stage 1 and 2 together |
| ``decoders`` | a part's decoders: batched trunks, mesh tails on CUDA streams, post threads |
| ``guidance`` | fast path: a guided step's two halves as one backbone call |
| ``image_rows`` | fast path: DINO once for the photo every object shares |
| ``sparse`` | fast paths in upstream's sparse ops: gathered broadcasts, row group norms |
| ``attention`` | fast path: upstream's sparse attention through PyTorch's varlen kernel |
| ``flow_compile`` | fast path: stage 1's flow blocks under ``torch.compile`` |

Dependencies point one way: ``backend`` -> ``flow`` -> ``decoders``, ``guidance``,
``image_rows``, ``sparse``, ``attention``; ``convert`` and ``preflight`` import no other
module of the package; ``surface`` reads the fast paths' modules, none imports it but
``backend`` and ``upstream``.
"""

from __future__ import annotations

from worker.backends.sam3d.backend import (
    DEFAULT_STEPS,
    FAST_STEPS,
    VERSION,
    WARM_UP_OPTIONS,
    Sam3dBackend,
    run_kwargs,
)
from worker.backends.sam3d.convert import (
    DEFAULT_FOV_DEG,
    NO_COLOUR,
    ImageOutputs,
    camera_from_pointmap,
    convert_output,
)
from worker.backends.sam3d.preflight import (
    GAUSSIAN_4_FILES,
    MODELS,
    REQUIRED_FILES,
    PreflightError,
    missing_checkpoint_files,
)

__all__ = [
    "DEFAULT_FOV_DEG",
    "DEFAULT_STEPS",
    "FAST_STEPS",
    "GAUSSIAN_4_FILES",
    "MODELS",
    "NO_COLOUR",
    "REQUIRED_FILES",
    "VERSION",
    "WARM_UP_OPTIONS",
    "ImageOutputs",
    "PreflightError",
    "Sam3dBackend",
    "camera_from_pointmap",
    "convert_output",
    "missing_checkpoint_files",
    "run_kwargs",
]
