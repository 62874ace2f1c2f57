"""The Python SDK: submit an image and masks, wait, read the 3D assets.

>>> from sam3d_client import Client
>>> client = Client("http://127.0.0.1:8000")
>>> job = client.submit("photo.jpg", masks)            # masks: numpy, COCO, RLE, PNG, ...
>>> result = job.wait(progress=True).result()
>>> result.objects[0].mesh_glb.save("cup.glb")
>>> job.download("out/photo")                          # the ``generate --out`` layout

Every request error is a :class:`ServiceError` with the service's stable ``code``; a job
that ends ``failed`` raises :class:`JobFailed` from :meth:`Job.result`. GETs are retried on
transient errors (no connection, 429, 502/503/504); a submit always carries an
``Idempotency-Key`` (generated when not given), so it is retried too and can never create
two jobs. Signed artifact URLs expire: a download answered 403 fetches the job again for
fresh URLs and retries once.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3d_client.errors import (
    Interrupted,
    InvalidInput,
    JobCanceled,
    JobFailed,
    ServiceError,
)
from sam3d_client.http import ARTIFACT_SUFFIXES, multipart
from sam3d_client.inputs import encode_geometry, encode_image, encode_masks, json_default
from sam3d_client.progress import StatusLine, describe_job
from sam3d_client.prompts import encode_prompts
from sam3d_client.transport import RetryPolicy, Transport

__all__ = [
    "Artifact",
    "Client",
    "Interrupted",
    "InvalidInput",
    "Job",
    "JobCanceled",
    "JobFailed",
    "ObjectMetadata",
    "ObjectResult",
    "Result",
    "RetryPolicy",
    "ServiceError",
]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
Locator = tuple[str | int, ...]  # where an artifact sits in a job's ``result``


def _locate(data: dict[str, Any], locator: Locator) -> dict[str, Any]:
    node: Any = data
    for step in locator:
        node = node[step]
    return node


def _find(data: dict[str, Any], locator: Locator) -> dict[str, Any] | None:
    """The entry at ``locator`` in a job snapshot, None when that snapshot lacks it."""
    try:
        entry = _locate(data, locator)
    except (KeyError, IndexError, TypeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("url") else None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(eq=False)
class Artifact:
    """One file of a result, downloaded on first :meth:`read` (then cached) or :meth:`save`."""

    name: str  # its path in the ``generate --out`` layout, e.g. ``objects/0.glb``
    url: str
    expires_at: str | None
    bytes_size: int | None
    content_type: str | None
    _job: Job = field(repr=False)
    _locator: Locator = field(repr=False)
    _minted_at: float = field(repr=False)  # when the job snapshot holding ``url`` came
    _data: bytes | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def size(self) -> int | None:
        """Size in bytes, as the service reports it."""
        return self.bytes_size

    @property
    def downloaded(self) -> bool:
        return self._data is not None

    def _adopt(self, entry: dict[str, Any], minted_at: float) -> None:
        self.url, self.expires_at = entry["url"], entry.get("expires_at")
        self._minted_at = minted_at

    def _fetch(self, target: Path | None) -> bytes | int:
        """Download (into ``target`` when given); one retry with a fresh URL after a 403."""
        transport = self._job._client._transport
        newer = self._job._artifact_entry(self._locator, newer_than=self._minted_at)
        if newer is not None:  # the job was fetched again since: its URL is the fresher one
            self._adopt(*newer)
        tried_at = time.monotonic()
        try:
            return transport.download(self.url, target, expected_bytes=self.bytes_size)
        except ServiceError as exc:
            if exc.status != 403:
                raise
        # The signed URL expired (or was revoked): take one minted after this attempt.
        self._adopt(*self._job._fresh_artifact(self._locator, since=tried_at))
        return transport.download(self.url, target, expected_bytes=self.bytes_size)

    def read(self) -> bytes:
        """The file's bytes (downloaded once, then kept in memory)."""
        with self._lock:
            if self._data is None:
                data = self._fetch(None)
                assert isinstance(data, bytes)
                self._data = data
            return self._data

    def json(self) -> Any:
        """The file parsed as JSON (for ``manifest``)."""
        return json.loads(self.read())

    def save(self, path: str | Path) -> Path:
        """Write the file to ``path`` (streamed unless already read; never half-written)."""
        path = Path(path)
        with self._lock:
            if self._data is not None:
                _write_atomically(path, self._data)
            else:
                self._fetch(path)
        return path


@dataclass(frozen=True)
class ObjectMetadata:
    """An object's pose, exactly as SAM 3D reports it, plus the local-to-scene ``matrix``.

    ``rotation`` is a w,x,y,z quaternion, ``translation`` and ``scale`` 3-vectors (PyTorch3D
    camera, row vectors, Z-up object frame); ``matrix`` is 4x4 row-major, column vectors:
    ``p_scene = matrix @ [p_local, 1]`` (see the README's "Outputs and their frames").
    """

    rotation: list[float]
    translation: list[float]
    scale: list[float]
    matrix: list[list[float]]
    extra: dict[str, Any] = field(default_factory=dict)  # any field added later

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectMetadata:
        known = ("rotation", "translation", "scale", "matrix")
        return cls(
            rotation=list(data.get("rotation") or []),
            translation=list(data.get("translation") or []),
            scale=list(data.get("scale") or []),
            matrix=[list(row) for row in data.get("matrix") or []],
            extra={k: v for k, v in data.items() if k not in known},
        )

    def matrix_array(self) -> Any:
        """``matrix`` as a (4, 4) float64 array."""
        import numpy as np  # optional: only for this array view

        return np.asarray(self.matrix, dtype=np.float64)


@dataclass(frozen=True)
class ObjectResult:
    """One object: its mesh and splats in its local frame, and its pose."""

    index: int
    mesh_glb: Artifact | None  # None when the job's ``formats`` left the format out
    gaussian_ply: Artifact | None
    metadata: ObjectMetadata
    #: every file of the object by its key (mesh_glb, gaussian_ply, gaussian_spz, mesh_usdz,
    #: splats_glb): those the job's ``formats`` asked for
    files: dict[str, Artifact] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """A succeeded job's output; ``mesh_glb``/``gaussian_ply`` are the whole scene."""

    job_id: str
    time: float | None
    mesh_glb: Artifact | None  # None without a scene GLB (``formats``, ``scene: false``)
    gaussian_ply: Artifact | None
    objects: list[ObjectResult]
    manifest: Artifact
    camera: dict[str, Any] | None
    timings: dict[str, Any] | None
    units: str = "relative"  # "metres" when the job had a depth map or pointmap
    scene_files: dict[str, Artifact] = field(default_factory=dict)  # every scene file by key

    def files(self) -> dict[str, Artifact]:
        """{path in the ``generate --out`` layout: artifact} for every file."""
        files = {a.name: a for a in self.scene_files.values()}
        for obj in self.objects:
            files.update({a.name: a for a in obj.files.values()})
        files["manifest.json"] = self.manifest
        return files


class Job:
    """A submitted job. Its fields are those of the latest fetch; :meth:`refresh` updates them."""

    def __init__(self, client: Client, data: dict[str, Any], *, replayed: bool = False) -> None:
        self._client = client
        self._data = data
        self._fetched_at = time.monotonic()  # when ``_data`` (and its URLs) came
        self._lock = threading.RLock()
        #: True when a submit returned an existing job (its Idempotency-Key was seen before).
        self.replayed = replayed

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r})"

    # -- the latest snapshot
    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def status(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed`` or ``canceled``."""
        return str(self._data["status"])

    @property
    def stage(self) -> str | None:
        return self._data.get("stage")

    @property
    def progress(self) -> tuple[int, int]:
        """(objects done, objects in all)."""
        progress = self._data.get("progress") or {}
        return int(progress.get("objects_done") or 0), int(progress.get("objects_total") or 0)

    @property
    def queue_position(self) -> int | None:
        return self._data.get("queue_position")

    @property
    def error(self) -> dict[str, Any] | None:
        """``{"code", "message", "retryable"}`` of a failed job."""
        return self._data.get("error")

    @property
    def data(self) -> dict[str, Any]:
        """The job's JSON as last fetched."""
        return dict(self._data)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    # -- requests
    def refresh(self) -> Job:
        """Fetch the job again (fresh status, progress and signed URLs)."""
        data = self._client._transport.json("GET", f"/v1/jobs/{self.id}")
        with self._lock:
            self._data, self._fetched_at = data, time.monotonic()
        return self

    def wait(
        self,
        timeout: float | None = None,
        *,
        progress: bool = False,
        poll_interval: float = 0.25,
        max_poll_interval: float = 3.0,
    ) -> Job:
        """Poll until the job is finished (any way); returns ``self``.

        Polls back off exponentially from ``poll_interval`` to ``max_poll_interval``, and
        start over from ``poll_interval`` whenever the job moves on. ``progress`` prints a
        one-line status (stage, objects done/total) to stderr. Raises ``TimeoutError``
        after ``timeout`` seconds.
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        line = StatusLine() if progress else None
        interval = poll_interval
        last = None
        try:
            while True:
                if not self.done or last is None:
                    self.refresh()
                state = (self.status, self.stage, self.progress, self.queue_position)
                if line is not None:
                    line.update(describe_job(self._data, time.monotonic() - started))
                if self.done:
                    return self
                moved = state != last
                interval = poll_interval if moved else min(max_poll_interval, interval * 1.5)
                last = state
                interval = self._pause(interval, deadline, timeout)
        finally:
            if line is not None:
                line.close()

    def result(self, timeout: float | None = None) -> Result:
        """The result, waiting for it if needed; ``JobFailed`` (``JobCanceled``) otherwise."""
        if not self.done:
            self.wait(timeout)
        if self.status == "failed":
            raise JobFailed(self, self.error)
        if self.status == "canceled":
            raise JobCanceled(self)
        if not self._data.get("result"):
            self.refresh()  # a snapshot without the result (a listing, a cancel answer)
        with self._lock:
            return self._build_result(self._data["result"])

    def _artifact(self, name: str, locator: Locator) -> Artifact:
        entry = _locate(self._data, locator)
        return Artifact(
            name=name,
            url=entry["url"],
            expires_at=entry.get("expires_at"),
            bytes_size=entry.get("bytes"),
            content_type=entry.get("content_type"),
            _job=self,
            _locator=locator,
            _minted_at=self._fetched_at,
        )

    def _build_result(self, result: dict[str, Any]) -> Result:
        objects = [
            self._object(obj, ("result", "objects", i)) for i, obj in enumerate(result["objects"])
        ]
        scene = self._files("scene", result.get("scene") or {}, ("result", "scene"))
        return Result(
            job_id=self.id,
            time=result.get("time"),
            mesh_glb=scene.get("mesh_glb"),
            gaussian_ply=scene.get("gaussian_ply"),
            scene_files=scene,
            objects=objects,
            manifest=self._artifact("manifest.json", ("result", "manifest")),
            camera=result.get("camera"),
            timings=result.get("timings"),
            units=result.get("units") or "relative",
        )

    def _object(self, obj: dict[str, Any], locator: Locator) -> ObjectResult:
        index = int(obj["index"])
        files = self._files(f"objects/{index}", obj, locator)
        return ObjectResult(
            index=index,
            mesh_glb=files.get("mesh_glb"),
            gaussian_ply=files.get("gaussian_ply"),
            metadata=ObjectMetadata.from_json(obj.get("metadata") or {}),
            files=files,
        )

    def _files(self, stem: str, entry: dict[str, Any], locator: Locator) -> dict[str, Artifact]:
        """Every artifact in ``entry`` (an object or the scene), named as ``generate`` names it."""
        return {
            key: self._artifact(stem + suffix, (*locator, key))
            for key, suffix in ARTIFACT_SUFFIXES.items()
            if isinstance(entry.get(key), dict)
        }

    @property
    def finished_objects(self) -> list[ObjectResult]:
        """The objects stored so far, as of the latest fetch (also those a failed, timed-out
        or canceled job finished before it stopped: the service keeps them)."""
        with self._lock:
            return [
                self._object(obj, ("objects", pos))
                for pos, obj in enumerate(self._data.get("objects") or [])
                if obj.get("state") == "done"
            ]

    def objects(
        self,
        timeout: float | None = None,
        *,
        poll_interval: float = 0.25,
        max_poll_interval: float = 3.0,
    ) -> Iterator[ObjectResult]:
        """Each object as soon as the service has stored it, while the job still runs; ends
        when the job succeeds. A job that fails (``JobFailed``) or is canceled
        (``JobCanceled``) raises after yielding every object it finished.

        >>> for obj in job.objects():
        ...     obj.mesh_glb.save(f"out/{obj.index}.glb")
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        seen: set[int] = set()
        interval = poll_interval
        while True:
            self.refresh()
            fresh = [o for o in self.finished_objects if o.index not in seen]
            for obj in fresh:
                seen.add(obj.index)
                yield obj
            if self.done:
                if self.status == "failed":
                    raise JobFailed(self, self.error)
                if self.status == "canceled":
                    raise JobCanceled(self)
                return
            interval = poll_interval if fresh else min(max_poll_interval, interval * 1.5)
            interval = self._pause(interval, deadline, timeout)

    def _pause(self, interval: float, deadline: float | None, timeout: float | None) -> float:
        """Sleep ``interval`` between polls, cut short by ``deadline`` (``TimeoutError`` once it
        has passed); returns the pause taken."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {self.id} still {self.status} after {timeout} s")
            interval = min(interval, left)
        self._client._transport.sleep(interval)
        return interval

    def _artifact_entry(
        self, locator: Locator, newer_than: float
    ) -> tuple[dict[str, Any], float] | None:
        """(entry, fetch time) of an artifact in the latest snapshot, if newer than that."""
        with self._lock:
            if self._fetched_at <= newer_than:
                return None
            entry = _find(self._data, locator)
            return None if entry is None else (entry, self._fetched_at)

    def _fresh_artifact(self, locator: Locator, since: float) -> tuple[dict[str, Any], float]:
        """(entry, fetch time) of an artifact with a URL minted after ``since`` (monotonic):
        one GET serves many expired artifacts, whoever comes first refreshes."""
        with self._lock:
            if self._fetched_at < since or _find(self._data, locator) is None:
                self.refresh()
            entry = _find(self._data, locator)
            if entry is None:
                raise ServiceError("no_result", f"job {self.id} is {self.status}: no such file")
            return entry, self._fetched_at

    def download(self, directory: str | Path) -> dict[str, Path]:
        """Write every file in the ``sam3d-jobs generate --out`` layout under ``directory``:
        scene.glb, scene.ply, objects/{i}.glb, objects/{i}.ply, manifest.json."""
        directory = Path(directory)
        return {name: art.save(directory / name) for name, art in self.result().files().items()}

    def cancel(self) -> Job:
        """Cancel: a queued job at once, a running one between objects (``already_finished``
        ServiceError when it had already succeeded or failed)."""
        data = self._client._transport.json("POST", f"/v1/jobs/{self.id}/cancel")
        with self._lock:
            self._data, self._fetched_at = data, time.monotonic()
        return self

    def delete(self) -> None:
        """Delete the job's record and files (``job_running``: cancel it first)."""
        self._client._transport.request("DELETE", f"/v1/jobs/{self.id}")


class Client:
    """A sam3d-jobs service at ``url``.

    ``api_key`` is sent as a Bearer token; ``timeout`` bounds each request (seconds);
    ``retry`` says how transient failures are retried; ``interrupt``, an event that when
    set makes waits, retries and downloads stop early with :class:`Interrupted`.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60,
        *,
        retry: RetryPolicy | None = None,
        interrupt: threading.Event | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._transport = Transport(self.url, api_key, timeout, retry, interrupt)

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    def submit(
        self,
        image: object,
        masks: object = None,
        *,
        mask_format: str | None = None,
        image_id: int | None = None,
        file_name: str | None = None,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        depth: object = None,
        pointmap: object = None,
        intrinsics: object = None,
        prompts: object = None,
        **options: Any,
    ) -> Job:
        """Submit one image and its object masks; returns the queued :class:`Job`.

        ``image``: a path, bytes (JPEG/PNG/WebP), a PIL image or a numpy (H, W, 3) array.
        ``masks``: a numpy (H, W) or (N, H, W) array or a list of arrays (sent as RLE);
        nested lists, polygons, RLE dict(s), a COCO dict; a path to a ``.json``/``.png``/
        ``.npy`` file, or a list of such paths; PNG bytes; or anything with a ``.mask``
        array (supervision's ``Detections``). ``mask_format`` turns off the service's
        guessing; ``image_id``/``file_name`` choose the image of a COCO file (for a COCO
        file of several images and an image path, the path's name is used).
        ``depth`` (a 16-bit PNG in millimetres or a float ``.npy`` in metres: path, bytes or
        array) or ``pointmap`` (``.npy`` (H, W, 3) metres, OpenCV camera frame: path, bytes or
        array), with ``intrinsics`` (``{"fx", "fy", "cx", "cy"}`` pixels, ``[fx, fy, cx, cy]``
        or a 3x3 K): metric placement; the result's ``units`` is then ``"metres"``.
        ``prompts`` instead of ``masks``: the worker's segmenter makes the masks from a list of
        ``{"box": [x0, y0, x1, y1]}``, ``{"points": [[x, y, 1 | 0], ...]}`` (or both) and
        ``{"text": "mug", "max_objects": 8, "min_score": 0.5}`` entries, an (N, 4) array of
        boxes, or a ``Detections`` (its ``xyxy``).
        ``options``: ``priority`` (``interactive`` or ``bulk``), ``seed`` and the backend's.
        """
        geometry = encode_geometry(depth=depth, pointmap=pointmap, intrinsics=intrinsics)
        filename, image_bytes = encode_image(image)
        payload = encode_masks(
            masks,
            image=image_bytes,
            mask_format=mask_format,
            image_id=image_id,
            file_name=file_name,
        )
        if (
            file_name is None
            and image_id is None
            and isinstance(image, str | Path)
            and payload.mask_format in (None, "coco")
            and isinstance(payload.mask_input, dict)
            and len(payload.mask_input.get("images") or []) > 1
        ):
            file_name = Path(image).name  # pick the COCO image named like the file
        fields: dict[str, str] = {}
        if prompts is not None:
            if masks is not None:
                raise InvalidInput("invalid_request", "give masks or prompts, not both")
            fields["prompts"] = json.dumps(encode_prompts(prompts))
        if payload.mask_input is not None:
            fields["mask_input"] = json.dumps(payload.mask_input, default=json_default)
        if payload.mask_format is not None:
            fields["mask_format"] = payload.mask_format
        if options:
            fields["options"] = json.dumps(options, default=json_default)
        if image_id is not None:
            fields["image_id"] = str(image_id)
        if file_name is not None:
            fields["file_name"] = file_name
        if webhook_url is not None:
            fields["webhook_url"] = webhook_url
        files = [("image", filename, image_bytes)]
        files += [("mask", f"mask{i}.png", data) for i, data in enumerate(payload.files)]
        if geometry is not None:
            kind, name, data, camera = geometry
            files.append((kind, name, data))
            fields["intrinsics"] = json.dumps(camera, default=json_default)
        body, content_type = multipart(fields, files)
        key = idempotency_key or f"sdk-{uuid.uuid4().hex}"
        response = self._transport.request(
            "POST",
            "/v1/jobs",
            body=body,
            headers={"Content-Type": content_type, "Idempotency-Key": key},
            idempotent=True,  # the key makes a repeat return the same job
        )
        replayed = str(response.headers.get("Idempotent-Replayed", "")).lower() == "true"
        return Job(self, response.json(), replayed=replayed)

    def job(self, job_id: str) -> Job:
        """The job ``job_id`` (fetched now)."""
        return Job(self, self._transport.json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, status: str | None = None, *, page_size: int = 100) -> Iterator[Job]:
        """Every job of this API key, newest first (``status`` filters), page by page."""
        cursor: str | None = None
        while True:
            query: dict[str, str | int] = {"limit": page_size}
            if status:
                query["status"] = status
            if cursor:
                query["cursor"] = cursor
            page = self._transport.json("GET", "/v1/jobs?" + urllib.parse.urlencode(query))
            for data in page.get("jobs", []):
                yield Job(self, data)
            cursor = page.get("next")
            if not cursor:
                return
