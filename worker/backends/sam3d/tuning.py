"""The batched path's knobs in one frozen object, built once from ``Settings`` and passed
down (``Sam3dBackend.tuning``): no module global is read for them, none is changed at run
time. bench/gpu.py's ways replace fields of a copy. What each default was measured at:
docs/perf/2026-12-04-sam3d-knobs.md."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.settings import Settings


@dataclass(frozen=True)
class Tuning:
    # From the settings (SAM3D_*): what an operator may want to change.
    batch_objects: bool = True  # false: upstream's run() once per mask
    cfg_pairs: bool = True  # a guided step's two halves in one backbone call
    postprocess_threads: int = 4  # host threads for upstream's GLB conversion and ours
    decoder_streams: int = 2  # mesh-decoder tails side by side on their own CUDA streams
    # Fixed here, each with its one-line why.
    prep_threads: int = 4  # objects' preprocessing and poses beside the flows
    pipeline_min_part: int | None = None  # whole chunks: two parts lost more to the GIL
    switch_interval_s: float | None = None  # Python's 5 ms beat 0.5 ms with batched trunks
    decoder_group_voxels: int = 1  # one object a tail call: grouping was within the noise
    batched_trunks: bool = True  # both decoders' trunks over the whole part, tails per object
    shared_image_rows: bool = True  # DINO once for the photo all objects of a part share
    gathered_broadcasts: bool = True  # one gather for per-object broadcasts (5,312 copies)
    row_group_norms: bool = True  # group norms as column reductions (155 ms of 648 in tails)
    pinned_copies: bool = True  # device-to-host copies through page-locked memory
    step_exits: bool = True  # canceled jobs' rows leave a cross-job batch at the next flow step

    @classmethod
    def from_settings(cls, settings: Settings) -> Tuning:
        return cls(
            batch_objects=settings.batch_objects,
            cfg_pairs=settings.cfg_pairs,
            postprocess_threads=settings.postprocess_threads,
            decoder_streams=settings.decoder_streams,
        )
