"""Budgets (time limits by object count, output estimates), retention sweeps against a real
redis-server and real local storage, and ``iter_objects`` over both backend shapes."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.artifacts import job_key
from jobs.budgets import check_output_budget, time_limits
from jobs.errors import Sam3dError
from jobs.masks import RleMasks, encode_masks_rle, mask_stats, rle_stats
from jobs.options import parse_options
from jobs.records import JobRecord, JobStatus, JobStore, new_job_id
from jobs.retention import Retention, track_upload
from jobs.settings import Settings
from jobs.storage import FileStorage
from worker.backends.base import iter_objects
from worker.backends.inflate import InflateBackend


def test_time_limit_grows_with_the_object_count_per_backend():
    settings = Settings(job_time_limit_s=300)
    assert time_limits(settings, "inflate", 0) == (270, 300)
    assert time_limits(settings, "inflate", 64)[1] == 300 + 10 * 64
    assert time_limits(settings, "sam3d", 64)[1] == 300 + 60 * 64
    soft, hard = time_limits(Settings(object_time_limit_s=2.5), "sam3d", 4)
    assert hard == 910 and soft == 880


def test_visibility_timeout_must_exceed_the_longest_job():
    with pytest.raises(Sam3dError, match="longest job"):
        Settings.from_env({"SAM3D_VISIBILITY_TIMEOUT_S": "960"})  # 900 + 64 x 10 s = 1540
    settings = Settings.from_env({"SAM3D_MAX_MASKS": "8"})
    assert settings.broker_visibility_timeout_s() == 900 + 8 * 10 + 60


def test_output_budget_refuses_what_would_not_fit():
    settings = Settings()
    small = parse_options("inflate", {})
    assert check_output_budget(settings, "inflate", small, 64) < settings.max_job_output_bytes
    huge = parse_options("inflate", {"splats": 2_000_000})
    with pytest.raises(Sam3dError) as info:
        check_output_budget(settings, "inflate", huge, 64)
    assert info.value.code.value == "job_too_large" and "10.0 GB" in info.value.message
    sam3d = parse_options("sam3d", {})
    assert check_output_budget(settings, "sam3d", sam3d, 64) < settings.max_job_output_bytes
    assert check_output_budget(Settings(max_job_output_bytes=0), "inflate", huge, 64) > 10**10
    # A baked texture counts: its raw pixels, in the object's GLB and again in the scene's.
    textured = check_output_budget(
        settings, "inflate", parse_options("inflate", {"texture": 4096}), 1
    )
    assert textured - check_output_budget(settings, "inflate", small, 1) == 2 * 3 * 4096**2


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client)


def finished_job(store: JobStore, storage: FileStorage) -> str:
    job_id = new_job_id()
    store.create(JobRecord(id=job_id, objects_total=1))
    store.transition(job_id, JobStatus.RUNNING)
    storage.put(job_key(job_id, "objects/0.glb"), b"glTF", content_type="model/gltf-binary")
    store.object_done(job_id, {"index": 0, "mesh_glb": {}, "gaussian_ply": {}})
    store.transition(job_id, JobStatus.SUCCEEDED, result={})
    return job_id


def test_retention_deletes_records_files_and_uploads_once_expired(store, tmp_path):
    storage = FileStorage(tmp_path)
    job_id = finished_job(store, storage)
    running = new_job_id()
    store.create(JobRecord(id=running))
    store.transition(running, JobStatus.RUNNING)
    storage.put("uploads/-/abc", b"img", content_type="image/png")
    track_upload(store, "uploads/-/abc")
    finished_at = store.get(job_id).finished_at
    retention = Retention(store, storage, retention_s=100)

    assert retention.sweep(now=finished_at + 50) == 0
    assert store.get(job_id) is not None and storage.exists(job_key(job_id, "objects/0.glb"))

    assert retention.sweep(now=finished_at + 101) == 2
    assert store.get(job_id) is None and store.objects(job_id) == {}
    assert not storage.exists(job_key(job_id, "objects/0.glb"))
    assert not storage.exists("uploads/-/abc")
    assert store.counts_by_status()["succeeded"] == 0  # no index keeps a dangling id
    assert store.get(running) is not None  # unfinished jobs never expire
    assert retention.sweep(now=finished_at + 1000) == 0


def test_retention_zero_keeps_everything(store, tmp_path):
    storage = FileStorage(tmp_path)
    job_id = finished_job(store, storage)
    assert Retention(store, storage, retention_s=0).sweep(now=1e12) == 0
    assert store.get(job_id) is not None


def test_rle_masks_decode_one_at_a_time_with_the_same_stats():
    yy, xx = np.mgrid[:60, :80]
    dense = np.stack([(xx - 30) ** 2 + (yy - 20) ** 2 < 150, (xx > 50) & (yy > 30)])
    masks = RleMasks(encode_masks_rle(dense), (60, 80))
    assert len(masks) == 2
    for i in range(2):
        assert np.array_equal(masks[i], dense[i])
        assert masks.stats(i) == mask_stats(dense[i]) == rle_stats(masks.rles[i])


class _Batched(InflateBackend):
    """Results through ``generate_many`` (as a batching GPU backend gives them)."""

    def __init__(self, extra: int = 0) -> None:
        self.calls, self.extra = [], extra

    def generate_many(self, image, masks, *, camera, seeds, options):
        self.calls.append(list(seeds))
        for i in range(len(masks) + self.extra):
            yield self.generate(image, masks[i % len(masks)], camera=camera, seed=seeds[0],
                                options=options)  # fmt: skip


def test_iter_objects_uses_generate_many_when_there_is_one(sample_image, sample_masks):
    options = parse_options("inflate", {"splats": 200, "resolution": 16})
    camera = InflateBackend().camera(sample_image, options)
    one_by_one = list(
        iter_objects(
            InflateBackend(),
            sample_image,
            sample_masks,
            camera=camera,
            seeds=[0] * len(sample_masks),
            options=options,
        )  # fmt: skip
    )
    batched = _Batched()
    many = list(
        iter_objects(
            batched,
            sample_image,
            sample_masks,
            camera=camera,
            seeds=[0] * len(sample_masks),
            options=options,
        )  # fmt: skip
    )
    assert batched.calls == [[0] * len(sample_masks)]
    assert [i for i, _ in many] == [i for i, _ in one_by_one] == list(range(len(sample_masks)))
    for (_, a), (_, b) in zip(one_by_one, many, strict=True):
        assert np.array_equal(a.mesh.vertices, b.mesh.vertices)
    with pytest.raises(RuntimeError, match="more than"):
        list(
            iter_objects(
                _Batched(extra=1),
                sample_image,
                sample_masks,
                camera=camera,
                seeds=[0] * len(sample_masks),
                options=options,
            )  # fmt: skip
        )


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_image_size_from_the_header_matches_decoding(orientation):
    import io

    from PIL import Image

    from jobs.images import decode_image, read_image_size

    im = Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        im.save(buf, fmt, exif=exif.tobytes())
        data = buf.getvalue()
        assert read_image_size(data) == decode_image(data).shape[:2], fmt


def test_header_read_refuses_what_decoding_refuses():
    from test_images import _bomb_png, _truncated

    from jobs.images import read_image_size

    for bad in (_truncated("PNG"), _truncated("JPEG"), _truncated("WEBP"), b"GIF89a...", b""):
        with pytest.raises(Sam3dError) as info:
            read_image_size(bad)
        assert info.value.code.value == "invalid_image"
    with pytest.raises(Sam3dError) as info:
        read_image_size(_bomb_png(50_000, 50_000))
    assert info.value.code.value == "image_too_large"


def test_masks_decoded_straight_to_rle_match_dense_decoding():
    from service import H, W, mask_inputs

    from jobs.masks import decode_masks, decode_masks_rle

    for family, (mask_input, count) in mask_inputs().items():
        rles = decode_masks_rle(mask_input, (H, W))
        dense = decode_masks(mask_input, (H, W))
        assert len(rles) == count == len(dense), family
        decoded = RleMasks(rles, (H, W))
        for i in range(count):
            assert np.array_equal(decoded[i], dense[i]), family
    with pytest.raises(Sam3dError) as info:
        decode_masks_rle([[500, 500, 600, 500, 600, 600]], (H, W))  # all outside the image
    assert info.value.code.value == "empty_mask"
