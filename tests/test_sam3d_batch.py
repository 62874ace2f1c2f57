"""The batching plan of the sam3d backend, without a GPU: chunks, decoder groups under
upstream's mesh-decoder voxel limit, and upstream's voxel post-processing kept per object."""

from __future__ import annotations

import torch

from worker.backends.sam3d import image_rows
from worker.backends.sam3d.decoders import MESH_DECODER_MAX_VOXELS, decoder_groups
from worker.backends.sam3d.flow import _per_object, chunks, parts
from worker.backends.sam3d.tuning import Tuning


def test_chunks_cover_every_object_in_order():
    assert chunks(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert chunks(2, 0) == [range(0, 1), range(1, 2)]
    assert [i for c in chunks(64, 38) for i in c] == list(range(64))


def test_parts_halve_a_chunk_only_where_each_half_still_fills_a_batch():
    assert Tuning().pipeline_min_part is None  # the default: chunks stay whole
    assert parts(8, 100) == [range(0, 8)]
    assert parts(64, 20) == chunks(64, 20)
    assert parts(8, 100, 4) == [range(0, 4), range(4, 8)]  # two parts: flows beside decoders
    assert parts(7, 100, 4) == [range(0, 7)]  # halves of 3 would nearly double stage 1
    assert parts(4, 100, 4) == [range(0, 4)]
    assert parts(1, 100, 4) == [range(0, 1)]
    assert parts(9, 100, 4) == [range(0, 5), range(5, 9)]
    # Memory for 20 at once: parts of 10, so one part's flows and another's decoders fit.
    assert parts(64, 20, 4) == chunks(64, 10)
    assert parts(64, 5) == chunks(64, 5)  # halves under 4 objects: the chunk stays whole
    assert [i for p in parts(64, 38) for i in p] == list(range(64))


def test_decoder_groups_stay_under_the_mesh_decoder_limit():
    voxels = [25_000, 15_000, 30_000, 42_000, 1_000, 500]
    groups = decoder_groups(voxels)
    assert groups == [[0, 1], [2], [3], [4, 5]]
    assert all(sum(voxels[i] for i in g) <= MESH_DECODER_MAX_VOXELS for g in groups)
    assert decoder_groups([]) == []


def test_voxel_post_processing_sees_one_object_at_a_time():
    """Upstream prunes isolated voxels on an occupancy grid that ignores the batch index: two
    objects' voxels at neighbouring cells would keep each other. Per object they do not."""
    seen = []

    def prune(coords):  # records what it is given, keeps voxels with a same-object neighbour
        seen.append(coords[:, 0].unique().tolist())
        xyz = coords[:, 1:]
        near = (torch.cdist(xyz.float(), xyz.float()) <= 1.0).sum(1) > 1
        return coords[near]

    a = torch.tensor([[0, 5, 5, 5], [0, 5, 5, 6], [0, 20, 20, 20]])
    b = torch.tensor([[1, 20, 20, 21], [1, 40, 40, 40], [1, 40, 41, 40]])
    kept = _per_object(prune)(torch.cat([a, b]))
    assert seen == [[0], [1]]
    assert kept.tolist() == [[0, 5, 5, 5], [0, 5, 5, 6], [1, 40, 40, 40], [1, 40, 41, 40]]
    assert len(prune(torch.cat([a, b]))) == 6  # all together, (0,20,20,20) and (1,20,20,21) stay


def test_downsampling_factors_are_per_object():
    def downsample(coords):
        return (coords // 2, 2) if len(coords) > 2 else (coords, 1)

    coords = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 2], [0, 3, 3, 3], [1, 4, 4, 4]])
    merged, factors = _per_object(downsample)(coords)
    assert factors.tolist() == [[2.0], [1.0]]
    assert merged.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [1, 4, 4, 4]]


def test_an_image_every_row_shares_is_encoded_once():
    """``shared_image_rows``' wrapper: the full photo, the same for every object of a part,
    through the encoder once and repeated; a batch of different images as it is."""
    seen = []

    def encoder(x, **kwargs):
        seen.append(x.shape[0])
        return x.flatten(1)[:, :4] * 2 + kwargs.get("shift", 0)

    forward = image_rows._once_for_equal_rows(encoder)
    photo = torch.rand(1, 3, 8, 8).expand(5, 3, 8, 8).clone()
    out = forward(photo, shift=1)
    assert seen == [1] and out.shape == (5, 4) and out.is_contiguous()
    assert torch.equal(out, encoder(photo, shift=1))
    crops = torch.rand(5, 3, 8, 8)
    seen.clear()
    assert torch.equal(forward(crops), encoder(crops))
    assert seen == [5, 5]  # ours, then the reference call
