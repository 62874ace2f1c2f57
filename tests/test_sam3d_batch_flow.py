"""``generate_outputs``'s order of work on the CPU: parts, each part's flows once, decoder calls
per object, post-processing per object, results in mask order.

SAM 3D itself cannot run here (no weights, no spconv), so the pipeline is a stand-in with
upstream's method names and calling conventions; each object's "voxels" encode its index and
seed, so a result that went to the wrong object or came back out of order shows. Most tests
decode on the calling thread (``decoder_streams=0``); the two-stream path runs here too, with
stand-ins for CUDA's streams and events (``cpu_streams``), and on the GPU against upstream's
own ``run()`` (tests/test_sam3d_gpu.py ``fast-in-parts``).
"""

from __future__ import annotations

import sys
import threading
import types

import numpy as np
import pytest
import torch

from worker.backends.sam3d import decoders, flow
from worker.backends.sam3d.tuning import Tuning

STEPS = 3  # the stand-in's stage-1 flow steps


class SparseTensor:
    def __init__(self, coords, feats):
        self.coords, self.feats = coords, feats


class Preprocessor:
    pointmap_transform = (None,)

    def _process_image_mask_pointmap_mess(self, rgb, mask, pointmap):
        return {
            "mask": mask,
            "image": rgb * mask,
            "rgb_image": rgb,
            "rgb_image_mask": mask,
        }


class StandInPipeline:
    """Upstream's pipeline surface that generate_outputs calls, recording the calls."""

    device = torch.device("cpu")
    decode_formats = ["mesh", "gaussian"]

    def __init__(self) -> None:
        self.ss_preprocessor = self.slat_preprocessor = Preprocessor()
        self.models = {
            name: types.SimpleNamespace(_generate_noise=None, _generate_dynamics=self._step)
            for name in ("ss_generator", "slat_generator")
        }
        self.steps = 0  # flow steps taken (each through the generator's _generate_dynamics)
        self.calls: list[tuple] = []
        self.lock = threading.Lock()

    @staticmethod
    def _down_sample_img(x):
        return x

    def compute_pointmap(self, rgba, pointmap):
        self.calls.append(("moge",))
        h, w = rgba.shape[:2]
        red = float(rgba[..., 0].mean())  # each image's pointmap tells which image it was
        return {"pointmap": torch.full((3, h, w), red), "pts_color": torch.zeros(3, h, w)}

    def _step(self, *args, **kwargs):
        self.steps += 1

    def sample_sparse_structure(self, ss_input, inference_steps=None, use_distillation=False):
        count = ss_input["mask"].shape[0]
        self.calls.append(("stage1", count))
        self.calls.append(("rgb", ss_input["rgb_image"].reshape(count, -1).mean(1).tolist()))
        for _ in range(STEPS):  # upstream's solver: the generator's dynamics once a step
            self.models["ss_generator"]._generate_dynamics()
        # Object b gets (b + 1) voxels whose x is the object's mask area: a fingerprint.
        area = ss_input["mask"].flatten(1).sum(1).int()
        coords = torch.cat(
            [
                torch.stack(
                    [
                        torch.full((b + 1,), b),
                        torch.full((b + 1,), int(area[b])),
                        *[torch.arange(b + 1)] * 2,
                    ],
                    1,
                )
                for b in range(count)
            ]
        ).int()
        return {"coords": coords, "downsample_factor": 1}

    def pose_decoder(self, view, scene_scale=None, scene_shift=None):
        return {k: torch.ones(1, n) for k, n in (("rotation", 4), ("translation", 3), ("scale", 3))}

    def sample_slat(self, slat_input, coords, inference_steps=None, use_distillation=False):
        self.calls.append(("stage2", int(coords[:, 0].max()) + 1))
        return SparseTensor(coords, coords[:, 1:2].float())

    def decode_slat(self, slat, formats):
        with self.lock:
            self.calls.append(("decode", int(slat.coords[:, 0].max()) + 1))
        per = [slat.feats[slat.coords[:, 0] == b] for b in range(int(slat.coords[:, 0].max()) + 1)]
        return {fmt: per for fmt in formats}

    def postprocess_slat_output(self, output, *flags):
        return {"glb": ("glb", float(output["mesh"][0][0, 0]))}


@pytest.fixture
def pipeline(monkeypatch):
    """Stand-ins for the two upstream modules generate_outputs imports."""
    sparse = types.ModuleType("sparse")
    sparse.SparseTensor = SparseTensor
    inference = types.ModuleType("inference_pipeline")
    inference.prune_sparse_structure = lambda coords, **_: coords
    inference.downsample_sparse_structure = lambda coords, **_: (coords, 1)
    package = "sam3d_objects.model.backbone.tdfy_dit.modules"
    names = package.split(".")
    for i in range(1, len(names) + 1):
        monkeypatch.setitem(sys.modules, ".".join(names[:i]), types.ModuleType(names[i - 1]))
    sys.modules[package].sparse = sparse
    monkeypatch.setitem(sys.modules, f"{package}.sparse", sparse)
    monkeypatch.setitem(sys.modules, "sam3d_objects.pipeline", types.ModuleType("pipeline"))
    monkeypatch.setitem(sys.modules, flow._PIPELINE_MODULE, inference)
    return StandInPipeline()


def masks_of(count: int) -> np.ndarray:
    """Object i's mask covers i + 1 pixels: its area identifies it in the stand-in's voxels."""
    masks = np.zeros((count, 8, 8), bool)
    for i in range(count):
        masks[i].flat[: i + 1] = True
    return masks


@pytest.mark.parametrize(
    "count,chunk,min_part,want_parts",
    [(8, 100, 4, [4, 4]), (5, 100, 4, [5]), (9, 4, 4, [4, 4, 1]), (8, 100, None, [8])],
)
def test_every_object_comes_back_once_in_order_part_by_part(
    pipeline, monkeypatch, count, chunk, min_part, want_parts
):
    tuning = Tuning(
        pipeline_min_part=min_part, decoder_group_voxels=1, postprocess_threads=3, decoder_streams=0
    )
    finished_on = []

    def finish(output):
        finished_on.append(threading.current_thread().name)
        return output

    image = np.full((8, 8, 3), 100, np.uint8)
    out = list(
        flow.generate_outputs(
            pipeline,
            image,
            masks_of(count),
            list(range(count)),
            {},
            chunk_size=chunk,
            finish=finish,
            tuning=tuning,
        )
    )
    assert len(out) == count
    for i, result in enumerate(out):
        # Its own voxels: x is object i's mask area, i + 1 (the stand-in's fingerprint).
        assert set(result["coords"][:, 1].tolist()) == {i + 1}
        assert result["glb"] == ("glb", float(i + 1))
        assert result["mesh"][0].shape[0] == result["coords"].shape[0]
    stages = [c for c in pipeline.calls if c[0] in ("stage1", "stage2")]
    assert stages == [(s, n) for n in want_parts for s in ("stage1", "stage2")]
    assert [c for c in pipeline.calls if c[0] == "moge"] == [("moge",)]  # once per image
    assert sum(1 for c in pipeline.calls if c[0] == "decode") == count  # one call per object
    assert finished_on and all(name.startswith("sam3d-post") for name in finished_on)


def test_a_part_without_voxels_fails_the_job_and_stops_the_threads(pipeline, monkeypatch):
    tuning = Tuning(pipeline_min_part=4, decoder_streams=0)
    from jobs.errors import Sam3dError

    own = pipeline.sample_sparse_structure

    def none_for_the_second_part(ss_input, **kwargs):
        out = own(ss_input, **kwargs)
        if len([c for c in pipeline.calls if c[0] == "stage1"]) == 2:
            out["coords"] = out["coords"][out["coords"][:, 0] != 1]  # object 5 lost its voxels
        return out

    pipeline.sample_sparse_structure = none_for_the_second_part
    image = np.full((8, 8, 3), 100, np.uint8)
    outputs = flow.generate_outputs(
        pipeline, image, masks_of(8), list(range(8)), {}, chunk_size=8, tuning=tuning
    )
    with pytest.raises(Sam3dError, match=r"objects \[5\]"):
        list(outputs)
    assert not [t for t in threading.enumerate() if t.name.startswith("sam3d-")]


class StandInTensor(SparseTensor):
    def type(self, dtype):
        return StandInTensor(self.coords, self.feats.to(dtype))


class TrunkBase:
    """Upstream's ``SparseTransformerBase`` surface: the trunk, here a recognisable map."""

    def forward(self, x):
        self.calls.append(("trunk", len(set(x.coords[:, 0].tolist()))))
        return StandInTensor(x.coords, x.feats * 2)


class MeshDecoder(TrunkBase):
    """Upstream's ``SLatMeshDecoder`` surface: trunk, upsampling blocks, out layer, a mesh per
    object; ``forward`` composes them as upstream's does."""

    def __init__(self, calls) -> None:
        self.calls = calls
        self.upsample = [self.block]

    def __call__(self, x):
        return self.forward(x)

    def block(self, h):
        self.calls.append(("tail", len(set(h.coords[:, 0].tolist()))))
        return StandInTensor(h.coords, h.feats + 1)

    def out_layer(self, h):
        return StandInTensor(h.coords, h.feats * 10)

    def to_representation(self, h):
        return [h.feats[h.coords[:, 0] == b] for b in range(int(h.coords[:, 0].max()) + 1)]

    def forward(self, x):
        h = TrunkBase.forward(self, x)
        for block in self.upsample:
            h = block(h)
        return self.to_representation(self.out_layer(h.type(x.feats.dtype)))


@pytest.fixture
def with_mesh_decoder(pipeline, monkeypatch):
    """The stand-in pipeline with a mesh decoder registered as upstream's class."""
    base = types.ModuleType("base")
    base.SparseTransformerBase = TrunkBase
    mesh = types.ModuleType("decoder_mesh")
    mesh.SLatMeshDecoder = MeshDecoder
    names = decoders._VAE_PACKAGE.split(".")
    for i in range(1, len(names) + 1):
        name = ".".join(names[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(names[i - 1]))
    monkeypatch.setitem(sys.modules, f"{decoders._VAE_PACKAGE}.base", base)
    monkeypatch.setitem(sys.modules, f"{decoders._VAE_PACKAGE}.decoder_mesh", mesh)
    pipeline.models["slat_decoder_mesh"] = MeshDecoder(pipeline.calls)
    own = pipeline.decode_slat

    def decode_slat(slat, formats):
        out = own(slat, [f for f in formats if f != "mesh"])
        if "mesh" in formats:
            out["mesh"] = pipeline.models["slat_decoder_mesh"](slat)
        return out

    pipeline.decode_slat = decode_slat
    return pipeline


@pytest.mark.parametrize("grouped", [False, True], ids=["one-each", "grouped"])
@pytest.mark.parametrize("batched", [True, False], ids=["trunks", "whole"])
def test_decoder_trunks_run_once_per_part_and_tails_once_per_object(
    with_mesh_decoder, monkeypatch, batched, grouped
):
    """Grouped (``Tuning.decoder_group_voxels`` over a part's voxels): one tail call (trunks) or one
    whole call per part; the same outputs either way."""
    tuning = Tuning(
        pipeline_min_part=3,
        decoder_group_voxels=10**6 if grouped else 1,
        batched_trunks=batched,
        decoder_streams=0,
    )
    pipeline = with_mesh_decoder
    image = np.full((8, 8, 3), 100, np.uint8)
    out = list(
        flow.generate_outputs(
            pipeline, image, masks_of(6), list(range(6)), {}, chunk_size=6, tuning=tuning
        )
    )
    assert len(out) == 6
    for i, result in enumerate(out):
        # The stand-in's map of object i's feats (its mask area, i + 1): ((x * 2) + 1) * 10,
        # one value per voxel of its own.
        voxels = len(result["coords"])
        assert result["mesh"][0].flatten().tolist() == [float((2 * (i + 1) + 1) * 10)] * voxels
        assert result["gaussian"][0].flatten().tolist() == [float(i + 1)] * voxels
        assert result["glb"] == ("glb", float((2 * (i + 1) + 1) * 10))
    trunks = [c for c in pipeline.calls if c[0] == "trunk"]
    tails = [c for c in pipeline.calls if c[0] == "tail"]
    decodes = [c for c in pipeline.calls if c[0] == "decode"]
    per_call = 3 if grouped else 1  # objects in a tail (or whole) call
    if batched:  # two parts of 3: a trunk and a Gaussian decode each, then the tail calls
        assert trunks == [("trunk", 3)] * 2 and decodes == [("decode", 3)] * 2
    else:  # every decoder call the whole decoder
        assert trunks == [("trunk", per_call)] * (6 // per_call)
        assert decodes == [("decode", per_call)] * (6 // per_call)
    assert tails == [("tail", per_call)] * (6 // per_call)


def test_a_mesh_decoder_of_another_class_gets_whole_calls(with_mesh_decoder, monkeypatch):
    """The trunk and tail are upstream's forward in pieces: a decoder whose forward is its own
    (a subclass, a patched checkpoint) is never split, it gets upstream's whole call."""
    tuning = Tuning(decoder_group_voxels=1, decoder_streams=0)
    pipeline = with_mesh_decoder

    class OwnForward(MeshDecoder):
        def forward(self, x):
            self.calls.append(("own", len(set(x.coords[:, 0].tolist()))))
            return super().forward(x)

    pipeline.models["slat_decoder_mesh"] = OwnForward(pipeline.calls)
    image = np.full((8, 8, 3), 100, np.uint8)
    out = list(
        flow.generate_outputs(
            pipeline, image, masks_of(4), list(range(4)), {}, chunk_size=4, tuning=tuning
        )
    )
    assert [c for c in pipeline.calls if c[0] == "own"] == [("own", 1)] * 4
    assert [c for c in pipeline.calls if c[0] == "decode"] == [("decode", 1)] * 4
    assert [r["glb"] for r in out] == [("glb", float((2 * (i + 1) + 1) * 10)) for i in range(4)]


class CpuEvent:
    """``torch.cuda.Event`` on the CPU: recorded before any stream waits on it."""

    def __init__(self) -> None:
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True


class CpuStream:
    """``torch.cuda.Stream`` on the CPU: which thread made it, that it waited for the part's
    event, and that it was synchronised before its outputs were handed on."""

    made: list[CpuStream] = []

    def __init__(self) -> None:
        self.thread = threading.current_thread().name
        self.waited = self.synced = 0
        CpuStream.made.append(self)

    def wait_event(self, event: CpuEvent) -> None:
        assert event.recorded, "a decoder stream waited on an event nobody recorded"
        self.waited += 1

    def synchronize(self) -> None:
        self.synced += 1


@pytest.fixture
def cpu_streams(monkeypatch):
    """The decoder-stream path (``streams`` > 0) on the CPU: CUDA's streams and events are
    stand-ins (no CUDA here); the threads, the futures and the order are the real code's."""
    import contextlib

    import torch

    CpuStream.made = []
    monkeypatch.setattr(torch.cuda, "Event", CpuEvent)
    monkeypatch.setattr(torch.cuda, "Stream", CpuStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return CpuStream.made


@pytest.mark.parametrize("batched", [True, False], ids=["trunks", "whole"])
def test_with_two_decoder_streams_objects_come_back_once_in_order(
    with_mesh_decoder, monkeypatch, cpu_streams, batched
):
    tuning = Tuning(
        pipeline_min_part=3,
        decoder_group_voxels=1,
        batched_trunks=batched,
        postprocess_threads=2,
        decoder_streams=2,
    )
    pipeline = with_mesh_decoder
    tails_on: list[str] = []
    own_tail = pipeline.models["slat_decoder_mesh"].to_representation

    def recorded_tail(h):
        tails_on.append(threading.current_thread().name)
        return own_tail(h)

    monkeypatch.setattr(pipeline.models["slat_decoder_mesh"], "to_representation", recorded_tail)
    image = np.full((8, 8, 3), 100, np.uint8)
    out = list(
        flow.generate_outputs(
            pipeline, image, masks_of(6), list(range(6)), {}, chunk_size=6, tuning=tuning
        )
    )
    assert [r["glb"] for r in out] == [("glb", float((2 * (i + 1) + 1) * 10)) for i in range(6)]
    assert len(tails_on) == 6 and all(t.startswith("sam3d-decode") for t in tails_on)
    decode_streams = [s for s in cpu_streams if s.thread.startswith("sam3d-decode")]
    assert 1 <= len(decode_streams) <= 2  # one per decoder thread, reused between calls
    assert sum(s.waited for s in decode_streams) == 6  # each call waited for its part
    assert sum(s.synced for s in decode_streams) == 6
    assert all(s.thread.startswith(("sam3d-decode", "sam3d-post")) for s in cpu_streams)
    assert not [t for t in threading.enumerate() if t.name.startswith("sam3d-")]


def test_rows_of_several_images_share_a_pass_each_on_its_own_image(pipeline):
    """Cross-job batching: rows of two images in one part; each row's condition is its own
    image's, each output carries its own image's pointmap, results in row order."""
    tuning = Tuning(decoder_streams=0, postprocess_threads=2)
    dark, light = np.full((8, 8, 3), 51, np.uint8), np.full((8, 8, 3), 204, np.uint8)
    dark_masks, light_masks = masks_of(2), np.zeros((3, 8, 8), bool)
    for i in range(3):
        light_masks[i].flat[: 3 + i] = True  # areas 3, 4, 5
    rows = [flow.Row(0, dark_masks, i, 7) for i in range(2)]
    rows += [flow.Row(1, light_masks, i, 9) for i in range(3)]
    out = list(
        flow.generate_rows(
            pipeline,
            [(dark, None, None), (light, None, lambda o: {**o, "light": True})],
            rows,
            {},
            chunk_size=100,
            tuning=tuning,
        )
    )
    assert [row for row, _ in out] == [0, 1, 2, 3, 4]
    assert [c for c in pipeline.calls if c[0] == "stage1"] == [("stage1", 5)]  # one pass
    (rgb,) = [c[1] for c in pipeline.calls if c[0] == "rgb"]
    assert rgb == pytest.approx([0.2] * 2 + [0.8] * 3)  # each row on its own photo
    assert [c for c in pipeline.calls if c[0] == "moge"] == [("moge",)] * 2  # once per image
    for (row, result), area in zip(out, [1, 2, 3, 4, 5], strict=True):
        assert set(result["coords"][:, 1].tolist()) == {area}  # its own mask
        assert float(result["pointmap"].mean()) == (51 if row < 2 else 204)  # its own image
        assert result.get("light", False) is (row >= 2)  # its own image's finish


def two_jobs_of_two_rows(pipeline, leaving, **tuning) -> list:
    """Rows 0, 1 of image 0 and rows 2, 3 of image 1 through ``generate_rows``."""
    image = np.full((8, 8, 3), 100, np.uint8)
    masks = masks_of(4)
    rows = [flow.Row(i // 2, masks, i, i) for i in range(4)]
    return list(
        flow.generate_rows(
            pipeline,
            [(image, None, None), (image, None, None)],
            rows,
            {},
            chunk_size=100,
            tuning=Tuning(decoder_streams=0, postprocess_threads=2, **tuning),
            leaving=leaving,
        )
    )


def test_rows_that_leave_at_a_flow_step_restart_the_part_without_them(pipeline):
    """A canceled job's rows leave at the next flow step: the part starts again without
    them, the other rows come back whole, and nothing of the leaver is yielded."""
    # image 1 canceled mid-flow, at stage 1's second step
    out = two_jobs_of_two_rows(pipeline, lambda: {1} if pipeline.steps >= 2 else set())
    assert [row for row, _ in out] == [0, 1]
    stage1 = [c for c in pipeline.calls if c[0] == "stage1"]
    assert stage1 == [("stage1", 4), ("stage1", 2)]  # left at step 2, restarted without
    assert pipeline.steps == 2 + STEPS  # the first pass stopped at its second step
    for row, result in out:
        assert set(result["coords"][:, 1].tolist()) == {row + 1}


def test_with_step_exits_off_rows_leave_before_the_decoders(pipeline):
    leaving = lambda: {0} if pipeline.steps >= 1 else set()  # noqa: E731
    out = two_jobs_of_two_rows(pipeline, leaving, step_exits=False)
    assert [row for row, _ in out] == [2, 3]  # nothing of the leaver
    assert [c for c in pipeline.calls if c[0] == "stage1"] == [("stage1", 4)]  # not stopped
