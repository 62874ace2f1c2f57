"""One job as a stream: objects come out of the backend one by one (or a batch at a time);
each is exported, stored and recorded by a pool of export threads while the backend generates
the next; the scene files and the manifest come last, assembled from the stored objects'
buffers without re-encoding them.

The thread that calls the backend (the one holding the GPU) does model work only: exports,
scene composition and uploads happen on the export threads. The exports' heavy parts (normals,
byte copies, compression, uploads) run in numpy, zlib and sockets, which release the GIL, so
threads use several cores without copying an object into another process (the Python between
those calls still holds the GIL: on an H100 a one-object fast job's model work took ~1.1 s
longer while the job before it exported, docs/perf/2026-12-08-service-h100-and-textures.md).
At most ``2 * threads`` generated objects wait for a free export thread (slack for the bursts
a batched backend yields, and for the previous job's scene files on the same cores), so at
most ``3 * threads`` are held at once (memory bounded); scene parts are spooled to local
disk, never all in memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jobs.artifacts import ARTIFACT_KEYS, CONTENT_TYPES, FORMAT_KEYS, object_path, scene_path
from jobs.depth import DepthInput
from jobs.frames import Camera
from jobs.masks import mask_stats
from jobs.options import object_formats, scene_formats
from worker.assets import glb, mesh_ops, ply, splats_glb, spz, texture, usdz
from worker.assets.scene import transform_splat_rows
from worker.backends.base import Backend, Gaussians, ObjectResult, iter_objects

MANIFEST_FORMAT = "sam3d-jobs/manifest@1"
FRAMES = {
    "object": "glTF axes: right-handed, +Y up; centred in the unit cube [-0.5, 0.5]^3",
    "scene": "OpenGL camera frame: camera at the origin looking down -Z, +X right, +Y up",
    "matrix": "4x4, row-major JSON, column vectors: per-object local -> scene",
    "rotation": "quaternion w,x,y,z as SAM 3D reports it: p_cam = (s * p_zup) @ R(q) + t in "
    "the PyTorch3D camera frame (+X left, +Y up, +Z forward), object frame Z-up",
    "camera": "u = cx + fx*X/(-Z), v = cy - fy*Y/(-Z) for a scene point (X, Y, Z), Z < 0",
    "units": "metres when a depth map or pointmap was given, else relative (unknown scale)",
}
JSON_TYPE = "application/json"
MAX_EXPORT_THREADS = 8  # past this, uploads and Redis writes gain nothing more


def export_threads(setting: int = 0) -> int:
    """Export threads for a job: ``setting``, or (0) one per core this process may use, at
    most ``MAX_EXPORT_THREADS``."""
    if setting > 0:
        return setting
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_EXPORT_THREADS, cores or 1))


class Canceled(Exception):
    """Raised between objects when the caller asked to stop."""


class Sink(Protocol):
    """Where a job's files go (storage, or memory for ``generate_assets``)."""

    def put(self, path: str, data: bytes, content_type: str) -> None: ...

    def put_file(self, path: str, file: Path, content_type: str) -> None: ...

    def get(self, path: str) -> bytes: ...

    def object_done(self, entry: dict[str, Any]) -> None:
        """Object ``entry["index"]``'s files are stored: make it visible."""


@dataclass
class MemorySink:
    """Every file in a dict by its relative path."""

    files: dict[str, bytes] = field(default_factory=dict)
    on_object: Callable[[dict[str, Any]], None] | None = None

    def put(self, path: str, data: bytes, content_type: str) -> None:
        self.files[path] = bytes(data)

    def put_file(self, path: str, file: Path, content_type: str) -> None:
        self.files[path] = Path(file).read_bytes()

    def get(self, path: str) -> bytes:
        return self.files[path]

    def object_done(self, entry: dict[str, Any]) -> None:
        if self.on_object is not None:
            self.on_object(entry)


@dataclass
class Artifacts:
    """Every file of a job by its relative path, plus the manifest (also in ``files``)."""

    files: dict[str, bytes] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def artifact_paths(count: int, options: Mapping[str, Any] | None = None) -> list[str]:
    """Relative paths of every artifact of a job with ``count`` objects under ``options``
    (the default formats when none are given)."""
    options = options or {}
    per_object = [object_path(i, f) for i in range(count) for f in object_formats(options)]
    return [*(scene_path(f) for f in scene_formats(options)), *per_object, "manifest.json"]


def _file_entry(path: str, size: int, content_type: str) -> dict[str, Any]:
    return {"path": path, "bytes": int(size), "content_type": content_type}


def restore_paths(entry: Mapping[str, Any], options: Mapping[str, Any]) -> list[str] | None:
    """The files a stored object needs for a resumed job to reuse it, or None when it cannot
    be reused (the scene needs its uncompressed GLB and its PLY and it lacks one): then it is
    generated again."""
    paths = [entry[key]["path"] for key in ARTIFACT_KEYS if key in entry]
    if not paths:
        return None
    if scene_formats(options):
        compressed = ((options.get("mesh") or {}).get("compression") or "none") != "none"
        if compressed or "mesh_glb" not in entry or "gaussian_ply" not in entry:
            return None
    return paths


@dataclass
class _ScenePart:
    """What the scene files need of one object, spooled to local disk."""

    matrix: np.ndarray
    num_splats: int
    mesh: tuple[dict, int, Path] | None = None  # (document, binary length, binary file)
    splats: tuple[dict, int, Path] | None = None  # the same for the mesh + splats GLB
    rows_file: Path | None = None  # scene-frame PLY rows


class ObjectStream:
    """Exports, stores and records objects on a pool of ``threads`` threads.

    Each object becomes visible (``sink.object_done``) as soon as its own files are stored,
    so objects appear as they finish, not strictly in index order. ``submit`` blocks while
    ``2 * threads`` objects already wait (bounded memory) and re-raises an export failure in the
    generating thread; ``finish`` writes the scene files and the manifest's scene entries.
    ``options`` chooses the formats and the mesh control (``jobs.options``).
    """

    def __init__(
        self,
        sink: Sink,
        *,
        spool: Path,
        threads: int = 0,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self.sink = sink
        self.spool = Path(spool)
        self.options = dict(options or {})
        self.object_formats = object_formats(self.options)
        self.scene_formats = scene_formats(self.options)
        mesh = self.options.get("mesh") or {}
        self.target_faces = mesh.get("target_faces")
        self.compression = mesh.get("compression") or "none"
        self.texture = int(self.options.get("texture") or 0)  # a baked texture's edge; 0: none
        self.entries: dict[int, dict[str, Any]] = {}
        self.parts: dict[int, _ScenePart] = {}
        self.export_s = 0.0  # summed over objects (threads overlap: more than wall time)
        self.threads = export_threads(threads)
        self._queue: queue.Queue = queue.Queue(maxsize=2 * self.threads)
        self._lock = threading.Lock()  # entries, parts, export_s and the sink's records
        self._error: BaseException | None = None
        self._workers = [
            threading.Thread(target=self._run, name=f"sam3d-export-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    # -- producer side (the generating thread)
    def submit(
        self, index: int, result: ObjectResult, *, stats: dict[str, Any], time_s: float
    ) -> None:
        """Queue a freshly generated object for export."""
        self._put(("new", index, result, stats, time_s))

    def add_stored(self, entry: dict[str, Any]) -> None:
        """An object stored by an earlier run (a resumed job): read back for the scene only."""
        self._put(("stored", int(entry["index"]), entry, None, 0.0))

    def _put(self, item: tuple) -> None:
        while True:
            self.raise_error()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Wait for every queued object to be stored; raise the first export failure."""
        alive = [w for w in self._workers if w.is_alive()]
        for _ in alive:
            self._queue.put(None)
        for worker in alive:
            worker.join()
        self.raise_error()

    def close_quietly(self) -> None:
        """``close``, its failure ignored: the job already failed for another reason, and the
        objects generated before that are still stored."""
        with contextlib.suppress(Exception):
            self.close()

    # -- the export threads
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # else drain: the producer sees the error on its next submit
                self._handle(*item)
            del item  # an idle thread holds no object

    def _handle(self, kind: str, index: int, payload: Any, stats: Any, time_s: float) -> None:
        try:
            t0 = time.perf_counter()
            if kind == "new":
                self._export(index, payload, stats, time_s)
            else:
                self._restore(index, payload)
            with self._lock:
                self.export_s += time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - handed to the producer
            with self._lock:
                self._error = self._error or exc

    def _export(self, index: int, result: ObjectResult, stats: dict, time_s: float) -> None:
        mesh = mesh_ops.decimate(result.mesh, self.target_faces)
        baked = png = None
        if self.texture:  # after decimation: unwrap, then bake (the photo, or the Gaussians)
            t0 = time.perf_counter()
            appearance = result.appearance or texture.gaussian_appearance(result.gaussians)
            baked = texture.bake(mesh, self.texture, appearance)
            png = glb.png_bytes(baked.image)
            bake_s = time.perf_counter() - t0
        # uncompressed: the scene is merged from it
        mesh_glb = glb.export_mesh_glb(mesh, baked, png)
        splats_raw = None
        if "splats_glb" in self.object_formats or "splats_glb" in self.scene_formats:
            splats_raw = splats_glb.export_splats_glb(mesh_glb, result.gaussians)
        # Encoded once: the object's PLY body, and the scene's rows moved from it.
        rows = ply.splat_rows(result.gaussians)
        make = {
            "glb": lambda: mesh_ops.compress_glb(mesh_glb, self.compression),
            "ply": lambda: ply.ply_from_rows(rows),
            "spz": lambda: spz.export_splat_spz(result.gaussians),
            "usdz": lambda: usdz.export_usdz(
                [(mesh.vertices, mesh.faces, glb.srgb_to_linear(mesh.colors))]
                if baked is None
                else [(baked.vertices, baked.faces, None, baked.uvs, png)]
            ),
            # Never compressed: glTF Transform drops KHR_gaussian_splatting, which it does not know.
            "splats_glb": lambda: splats_raw,
        }
        matrix = result.pose.matrix()
        entry: dict[str, Any] = {
            "index": index,
            "mask": stats,
            "metadata": result.pose.to_metadata(),
        }
        for fmt in self.object_formats:
            data = make[fmt]()
            path = object_path(index, fmt)
            self.sink.put(path, data, CONTENT_TYPES[fmt])
            entry[FORMAT_KEYS[fmt]] = _file_entry(path, len(data), CONTENT_TYPES[fmt])
            del data
        if baked is not None:
            entry["texture"] = {
                "size": self.texture,
                "bytes": len(png),
                "bake_s": round(bake_s, 4),
                "from": getattr(appearance, "source", "appearance"),
            }
        entry.update(
            {
                "num_vertices": len(mesh.vertices if baked is None else baked.vertices),
                "num_faces": len(mesh.faces),
                "num_splats": len(result.gaussians),
                "time_s": round(time_s, 4),
            }
        )
        if mesh is not result.mesh:
            entry["num_faces_generated"] = len(result.mesh.faces)
        with self._lock:
            self.sink.object_done(entry)  # visible now; the scene parts below are local
        self._keep(index, entry, mesh_glb, splats_raw, rows, matrix)

    def _restore(self, index: int, entry: dict[str, Any]) -> None:
        if not self.scene_formats:
            with self._lock:
                self.entries[index] = entry
            return
        mesh_glb = self.sink.get(entry["mesh_glb"]["path"])
        gaussians = ply.read_splat_ply(self.sink.get(entry["gaussian_ply"]["path"]))
        splats_raw = None
        if "splats_glb" in self.scene_formats:
            splats_raw = splats_glb.export_splats_glb(mesh_glb, gaussians)
        matrix = np.asarray(entry["metadata"]["matrix"], dtype=np.float64)
        self._keep(index, entry, mesh_glb, splats_raw, ply.splat_rows(gaussians), matrix)

    def _spool_glb(self, name: str, data: bytes) -> tuple[dict, int, Path]:
        doc, binary = glb.read_glb(data)
        file = self.spool / name
        file.write_bytes(binary)
        return doc, len(binary), file

    def _keep(
        self,
        index: int,
        entry: dict,
        mesh_glb: bytes,
        splats_raw: bytes | None,
        rows: np.ndarray,
        matrix: np.ndarray,
    ) -> None:
        part = _ScenePart(matrix=matrix, num_splats=len(rows))
        scene = self.scene_formats
        if "glb" in scene or "usdz" in scene:
            part.mesh = self._spool_glb(f"{index}.glb", mesh_glb)
        if "splats_glb" in scene and splats_raw is not None:
            part.splats = self._spool_glb(f"{index}.splats.glb", splats_raw)
        if "ply" in scene or "spz" in scene:
            part.rows_file = self.spool / f"{index}.rows"
            transform_splat_rows(rows, matrix).tofile(part.rows_file)
        with self._lock:
            self.parts[index] = part
            self.entries[index] = entry

    # -- the end
    def _scene_glb(self, parts: Sequence[_ScenePart], which: str, fmt: str) -> dict[str, Any]:
        """scene.glb (meshes, compressed as asked) or scene.splats.glb (meshes and splats)."""
        pieces = [getattr(p, which) for p in parts]
        file = self.spool / scene_path(fmt)
        with open(file, "wb") as out:
            glb.write_scene_glb(
                out,
                [doc for doc, _, _ in pieces],
                [length for _, length, _ in pieces],
                [p.matrix for p in parts],
                lambda i: pieces[i][2].read_bytes(),
            )
        if self.compression != "none" and fmt == "glb":
            packed = file.with_suffix(".packed.glb")
            mesh_ops.compress_glb_file(file, packed, self.compression)
            file = packed
        return self._put_scene(fmt, file)

    def _put_scene(self, fmt: str, file: Path) -> dict[str, Any]:
        path = scene_path(fmt)
        self.sink.put_file(path, file, CONTENT_TYPES[fmt])
        return _file_entry(path, file.stat().st_size, CONTENT_TYPES[fmt])

    def finish(self, count: int) -> dict[str, dict[str, Any]]:
        """Wait for the objects, then write the scene files; their manifest entries."""
        self.close()
        missing = [i for i in range(count) if i not in self.entries]
        if missing:
            raise RuntimeError(f"objects {missing} were never stored")
        scene: dict[str, Any] = {}
        if not self.scene_formats:
            return scene
        parts = [self.parts[i] for i in range(count)]
        total = sum(p.num_splats for p in parts)
        for fmt in self.scene_formats:
            key = FORMAT_KEYS[fmt]
            if fmt == "glb":
                scene[key] = self._scene_glb(parts, "mesh", fmt)
            elif fmt == "splats_glb":
                scene[key] = self._scene_glb(parts, "splats", fmt)
            elif fmt == "usdz":
                meshes = [glb.read_meshes(p.mesh[0], p.mesh[2].read_bytes())[0] for p in parts]
                file = self.spool / scene_path(fmt)
                file.write_bytes(usdz.export_usdz(meshes, [p.matrix for p in parts]))
                del meshes
                scene[key] = self._put_scene(fmt, file)
            elif fmt == "ply":
                file = self.spool / scene_path(fmt)
                with open(file, "wb") as out:
                    out.write(ply.ply_header(total))
                    for p in parts:
                        with open(p.rows_file, "rb") as rows:
                            shutil.copyfileobj(rows, out, 8 * 2**20)
                scene[key] = self._put_scene(fmt, file)
            elif fmt == "spz":
                file = self.spool / scene_path(fmt)

                def pieces() -> Iterable[Gaussians]:
                    for p in parts:
                        yield ply.gaussians_from_rows(np.fromfile(p.rows_file, dtype="<f4"))

                with open(file, "wb") as out:
                    spz.write_splat_spz(out, total, pieces)
                scene[key] = self._put_scene(fmt, file)
        scene["num_splats"] = total
        return scene


def build_manifest(
    *,
    job_id: str,
    backend: Backend,
    options: Mapping[str, Any],
    camera: Camera | dict | None,
    image_size: tuple[int, int],
    timings: dict[str, float],
    scene: dict[str, Any],
    objects: Sequence[dict[str, Any]],
    depth_kind: str | None = None,
) -> dict[str, Any]:
    """The manifest: how the job was made, its frames, camera, timings and every file."""
    return {
        "format": MANIFEST_FORMAT,
        "job_id": job_id,
        "backend": {"name": backend.name, "version": backend.version},
        "seed": int(options["seed"]),
        "options": dict(options),
        "frames": FRAMES,
        "camera": camera.to_dict() if isinstance(camera, Camera) else camera,
        "units": "metres" if depth_kind else "relative",
        "depth_input": depth_kind,
        "image": {"width": int(image_size[1]), "height": int(image_size[0])},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "scene": scene,
        "objects": list(objects),
    }


def object_stats(masks: Sequence[np.ndarray], index: int) -> dict[str, Any]:
    """Area and bbox of mask ``index``: from its RLE when the masks keep one."""
    stats = getattr(masks, "stats", None)
    return dict(stats(index)) if stats is not None else dict(mask_stats(masks[index]))


class MaskSubset(Sequence):
    """The masks still to generate, by position, without copying them."""

    def __init__(self, masks: Sequence[np.ndarray], indices: Sequence[int]) -> None:
        self.masks, self.indices = masks, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos):  # type: ignore[override]
        if isinstance(pos, slice):
            return [self.masks[self.indices[p]] for p in range(*pos.indices(len(self)))]
        return self.masks[self.indices[pos]]


class _ReadAhead(Sequence):
    """``items`` (masks decoded on access) read one ahead: when item i is taken, item i + 1
    starts decoding on ``pool`` while the backend works on i. Memory: one extra item."""

    def __init__(self, items: Sequence[np.ndarray], pool: ThreadPoolExecutor) -> None:
        self.items, self.pool = items, pool
        self._next: tuple[int, Future] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, pos):  # type: ignore[override]
        if isinstance(pos, slice):
            return [self[p] for p in range(*pos.indices(len(self)))]
        pos = range(len(self))[pos]  # negative positions; IndexError past the end
        ahead, self._next = self._next, None
        value = ahead[1].result() if ahead is not None and ahead[0] == pos else self.items[pos]
        if pos + 1 < len(self):
            self._next = (pos + 1, self.pool.submit(self.items.__getitem__, pos + 1))
        return value


def stream_objects(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    backend: Backend,
    stream: ObjectStream,
    *,
    options: Mapping[str, Any],
    camera: Camera | None,
    todo: Sequence[int],
    should_stop: Callable[[], None] | None = None,
    on_camera: Callable[[Camera], None] | None = None,
    depth: DepthInput | None = None,
) -> Camera | None:
    """Generate the objects ``todo`` and hand each to ``stream`` as it comes; returns the
    camera (the backend's, or the first result's). ``should_stop`` raises to stop early.
    With ``depth`` (metric depth or a pointmap) the backend gets it as ``depth=``."""
    seed = int(options["seed"])  # every object gets the job's seed, as it always has
    subset = MaskSubset(masks, todo)
    t0 = time.perf_counter()
    if should_stop is not None:
        should_stop()
    metric = {"depth": depth} if depth is not None else {}  # backends without depth still work
    seeds = [seed] * len(subset)
    pool = ThreadPoolExecutor(1, thread_name_prefix="sam3d-masks")  # the next mask, ahead
    try:
        for pos, result in iter_objects(
            backend, image, _ReadAhead(subset, pool), camera=camera, seeds=seeds,
            options=options, **metric,
        ):  # fmt: skip
            now = time.perf_counter()
            if camera is None and result.camera is not None:
                camera = result.camera
                if on_camera is not None:
                    on_camera(camera)
            index = subset.indices[pos]
            stream.submit(index, result, stats=object_stats(masks, index), time_s=now - t0)
            del result
            if should_stop is not None:
                should_stop()
            t0 = time.perf_counter()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return camera


def generate_assets(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    backend: Backend,
    *,
    options: Mapping[str, Any],
    job_id: str,
    on_object: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    depth: DepthInput | None = None,
) -> Artifacts:
    """Generate every object, export it, compose the scene and write the manifest, in memory
    (the CLI's ``generate``; the worker streams the same steps into storage). With ``depth``
    (a metric depth map or pointmap), its intrinsics are the camera and the backend gets it
    as ``depth=``; poses and sizes are then in metres."""
    started = time.perf_counter()
    total = len(masks)
    done = 0

    def object_done(entry: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if on_object is not None:
            on_object(done, total)

    def should_stop() -> None:
        if should_cancel is not None and should_cancel():
            raise Canceled("canceled between objects")

    sink = MemorySink(on_object=object_done)
    with tempfile.TemporaryDirectory(prefix=f"sam3d-{job_id}-") as spool:
        stream = ObjectStream(sink, spool=Path(spool), options=options)
        try:
            camera = stream_objects(
                image,
                masks,
                backend,
                stream,
                options=options,
                camera=depth.camera if depth is not None else backend.camera(image, options),
                todo=range(total),
                should_stop=should_stop,
                depth=depth,
            )
        except BaseException:
            stream.close_quietly()
            raise
        generated = time.perf_counter()
        scene = stream.finish(total)
    finished = time.perf_counter()
    manifest = build_manifest(
        job_id=job_id,
        backend=backend,
        options=options,
        camera=camera,
        image_size=image.shape[:2],
        timings={
            "generate_s": generated - started,
            "export_s": stream.export_s,
            "finish_s": finished - generated,
            "total_s": finished - started,
        },
        scene=scene,
        objects=[stream.entries[i] for i in range(total)],
        depth_kind=depth.kind if depth is not None else None,
    )
    sink.files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    return Artifacts(files=sink.files, manifest=manifest)
