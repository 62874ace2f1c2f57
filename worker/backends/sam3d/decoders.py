"""A part's decoders (``flow.generate_outputs``): the Gaussian decoder and the mesh decoder's
transformer trunk over the whole part, then the mesh decoder's tails (upsampling, FlexiCubes:
what upstream's 42,000-voxel limit is for) one object per call on their own threads and CUDA
streams, then each object's host-side post-processing (upstream's GLB conversion, ours)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from worker.backends.sam3d.tuning import Tuning

MESH_DECODER_MAX_VOXELS = 42_000  # upstream: max(int32) / (64 * 768), per decoder call
GAUSSIAN_FORMATS = ("gaussian", "gaussian_4")
_VAE_PACKAGE = "sam3d_objects.model.backbone.tdfy_dit.models.structured_latent_vae"


def decoder_groups(voxels: Sequence[int], limit: int = MESH_DECODER_MAX_VOXELS) -> list[list[int]]:
    """Consecutive objects grouped so each group's voxels stay within ``limit``."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(voxels):
        if groups and total + n <= limit:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


def mesh_trunk(pipeline, formats) -> tuple[Callable, Callable] | None:
    """The mesh decoder as (trunk, tail) when it is upstream's ``SLatMeshDecoder`` unchanged:
    the trunk, its sparse transformer, takes any number of objects (windowed attention never
    crosses objects; 768 channels a voxel); the tail, its upsampling to 4x the resolution and
    FlexiCubes, is what the 42,000-voxel limit is for, so it goes one object per call. Their
    composition is upstream's ``forward``. None where the mesh is not decoded or the decoder
    is another class (then whole upstream calls)."""
    model = dict(getattr(pipeline, "models", {})).get("slat_decoder_mesh")
    if "mesh" not in formats or model is None:
        return None
    try:
        mesh = importlib.import_module(f"{_VAE_PACKAGE}.decoder_mesh")
        base = importlib.import_module(f"{_VAE_PACKAGE}.base")
    except ImportError:
        return None
    if type(model).forward is not mesh.SLatMeshDecoder.forward:
        return None

    import torch

    def trunk(slat):
        # no_grad as upstream's decode_slat has it (its models load frozen: a safeguard).
        with torch.no_grad(), torch.profiler.record_function("sam3d:mesh_trunk"):
            return base.SparseTransformerBase.forward(model, slat)

    def tail(h, dtype):
        with torch.profiler.record_function("sam3d:mesh_tail"):
            for block in model.upsample:
                h = block(h)
            return model.to_representation(model.out_layer(h.type(dtype)))

    return trunk, tail


class Decoder:
    """A part's decoder calls (``generate_outputs``), then each object's post-processing.

    With ``tuning.batched_trunks`` (and upstream's own mesh decoder), on the calling thread right
    after stage 2: the Gaussian decoder over the whole part (upstream's ``decode_slat`` with
    the Gaussian formats: a list of one ``Gaussian`` per object) and the mesh decoder's trunk;
    then one call per object of the mesh decoder's tail on the decoder streams. Otherwise one
    ``decode_slat`` of every format per object (or group)."""

    def __init__(self, pipeline, sp, kwargs, post, pool, tuning: Tuning) -> None:
        import threading

        self.pipeline, self.sp, self.kwargs = pipeline, sp, kwargs
        self.post, self.pool = post, pool
        self.formats = list(kwargs.get("decode_formats") or pipeline.decode_formats)
        self.tuning = tuning
        self.mesh = mesh_trunk(pipeline, self.formats) if tuning.batched_trunks else None
        self.local = threading.local()  # each decoder thread's CUDA stream

    def submit(self, sampled: dict) -> list[Future]:
        """One future per decoder call, in order: its objects' post-processing futures, each
        giving ``(row, finish(output))``. ``sampled`` (``flow._sample_part``) carries, per
        object of the part, its row, its image's shared outputs and its ``finish``."""
        import torch

        limit = min(self.tuning.decoder_group_voxels, MESH_DECODER_MAX_VOXELS)
        groups = decoder_groups(sampled["voxel_counts"], limit)
        if self.mesh is not None:
            calls = self._trunks(sampled, groups)
        else:
            calls = [functools.partial(self._outputs, sampled, group) for group in groups]
        if self.pool is None:
            done = []
            for call in calls:
                future: Future = Future()
                future.set_result(self._post(call()))
                done.append(future)
            return done
        ready = torch.cuda.Event()
        ready.record()  # the part's stage 2 (and trunk) outputs, on this thread's stream
        futures: dict[int, Future] = {}
        for i in self._submit_order(groups, sampled["voxel_counts"]):
            futures[i] = self.pool.submit(self._on_stream, calls[i], ready)
        return [futures[i] for i in range(len(calls))]

    def _stream(self):
        """This thread's own CUDA stream (decoder and post threads each have one)."""
        import torch

        stream = getattr(self.local, "stream", None)
        if stream is None:
            stream = self.local.stream = torch.cuda.Stream()
        return stream

    def _on_stream(self, call: Callable[[], list[dict]], ready) -> list[Future]:
        import torch

        stream = self._stream()
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            outputs = on_thread(self.pipeline, call)
        stream.synchronize()  # complete before other threads' streams read them
        return self._post(outputs)

    def _post(self, outputs: list[dict]) -> list[Future]:
        args = (self.pipeline, self.kwargs)
        pinned = self.tuning.pinned_copies
        submit = self.post.submit
        if self.pool is None:  # decoded on the flows' thread, in turn: its stream
            return [submit(_finish, *args, o, pinned) for o in outputs]
        return [submit(self._finish_on_stream, *args, o, pinned) for o in outputs]

    def _finish_on_stream(self, *args):
        """``_finish`` with this post thread's GPU work (the Gaussians' conversion, the copies
        to the host) on its own stream, not queued behind the next part's flows on the default
        one. Its inputs are complete: the decoder thread synchronised its stream."""
        import torch

        with torch.cuda.stream(self._stream()):
            return _finish(*args)

    def _select(self, sampled: dict, group: list[int], feats):
        """The group's objects of a part-wide sparse tensor's ``feats``, batch indices 0..n-1."""
        import torch

        coords, batch = sampled["coords"], sampled["batch"]
        select = torch.isin(batch, torch.tensor(group, device=batch.device))
        remap = torch.full((len(sampled["part"]),), -1, dtype=coords.dtype, device=coords.device)
        remap[torch.tensor(group, device=coords.device)] = torch.arange(
            len(group), dtype=coords.dtype, device=coords.device
        )
        sub_coords = coords[select].clone()
        sub_coords[:, 0] = remap[sub_coords[:, 0].long()]
        return self.sp.SparseTensor(coords=sub_coords, feats=feats[select])

    def _output(self, sampled: dict, b: int, decoded: dict) -> dict:
        """Object ``b``'s upstream-shaped output dict, ``decoded`` its formats."""
        import torch

        ss, coords, batch = sampled["ss"], sampled["coords"], sampled["batch"]
        pose = {
            key: ss[key][b : b + 1]
            for key in ("rotation", "translation", "scale")
            if torch.is_tensor(ss.get(key))
        }
        own = {ROW: sampled["part"][b], FINISH: sampled["finish"][b]}
        return {**pose, **decoded, "coords": coords[batch == b], **sampled["shared"][b], **own}

    def _outputs(self, sampled: dict, group: list[int]) -> list[dict]:
        """The group's objects decoded by upstream's ``decode_slat``: one output dict each."""
        slat = self._select(sampled, group, sampled["slat"].feats)
        decoded = self.pipeline.decode_slat(slat, self.formats)
        return [
            self._output(sampled, b, {key: [values[j]] for key, values in decoded.items()})
            for j, b in enumerate(group)
        ]

    def _trunks(self, sampled: dict, groups: list[list[int]]) -> list[Callable[[], list[dict]]]:
        """The part-wide decoder work, now; one call per group for the mesh tails."""
        slat = sampled["slat"]
        gaussian = [f for f in self.formats if f in GAUSSIAN_FORMATS]
        splats = self.pipeline.decode_slat(slat, gaussian) if gaussian else {}
        trunk, tail = self.mesh
        h = trunk(slat)
        dtype = slat.feats.dtype

        def tails(group: list[int]) -> list[dict]:
            meshes = tail(self._select(sampled, group, h.feats), dtype)
            return [
                self._output(sampled, b, {"mesh": [mesh], **{k: [v[b]] for k, v in splats.items()}})
                for b, mesh in zip(group, meshes, strict=True)
            ]

        return [functools.partial(tails, group) for group in groups]

    def _submit_order(self, groups: list[list[int]], counts: list[int]) -> list[int]:
        """Largest tail calls first, so the streams finish together."""
        if self.mesh is None:
            return list(range(len(groups)))
        totals = [sum(counts[b] for b in group) for group in groups]
        return sorted(range(len(groups)), key=lambda i: -totals[i])


ROW, FINISH = "_sam3d_row", "_sam3d_finish"  # ours, taken off before upstream sees the output


def _finish(pipeline, kwargs, output: dict, pinned: bool = True) -> tuple[int, Any]:
    """Upstream's post-processing of one decoded object (its GLB), then its ``finish``:
    ``(row, finished output)``. Its mesh comes to the host first through page-locked memory
    (``host_copy``): upstream's GLB conversion then finds it there (its ``.cpu()`` calls
    copy nothing)."""
    row, finish = output.pop(ROW), output.pop(FINISH)
    _mesh_to_host(output, pinned)
    output.update(
        pipeline.postprocess_slat_output(
            output,
            kwargs.get("with_mesh_postprocess", False),
            kwargs.get("with_texture_baking", False),
            kwargs.get("use_vertex_color", True),
        )
    )
    return row, finish(output) if finish is not None else output


MESH_TENSORS = ("vertices", "faces", "vertex_attrs")  # what upstream's GLB conversion reads


def _mesh_to_host(output: dict, pinned: bool = True) -> None:
    import torch

    from worker.backends.sam3d.convert import host_copy

    for mesh in output.get("mesh") or []:
        for name in MESH_TENSORS:
            value = getattr(mesh, name, None)
            if torch.is_tensor(value) and value.is_cuda:
                setattr(mesh, name, torch.from_numpy(host_copy(value, pinned)))


def on_thread(pipeline, fn, *args):
    """``fn(*args)`` on a helper thread as on the caller's: the default device and no_grad
    are per thread in torch. (So is the CUDA stream: the default one unless the thread has
    entered another, as the decoder threads do.)"""
    import torch

    with pipeline.device, torch.no_grad():
        return fn(*args)
