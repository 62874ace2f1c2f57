"""A small HTTP client for the service (standard library only)."""

from __future__ import annotations

import json
import mimetypes
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

# Each artifact's key in a job's result and the end of its file name (``jobs.artifacts``).
ARTIFACT_SUFFIXES = {
    "mesh_glb": ".glb",
    "gaussian_ply": ".ply",
    "gaussian_spz": ".spz",
    "mesh_usdz": ".usdz",
    "splats_glb": ".splats.glb",
}


class ApiError(Exception):
    """The service answered with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _request(req: urllib.request.Request, timeout: float) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            err = {"code": "http_error", "message": body[:200].decode(errors="replace")}
        raise ApiError(exc.code, err.get("code", "?"), err.get("message", "")) from None


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """Encode form fields and (field, filename, bytes) files as multipart/form-data."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, data in files:
        kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: {kind}\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Http:
    """JSON over HTTP against one base URL, with an optional API key."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", **(extra or {})}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def json(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        extra = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(
            self._url(path),
            data=data,
            method=method,
            headers=self._headers({**extra, **(headers or {})}),
        )
        _, _, raw = _request(req, self.timeout)
        return json.loads(raw) if raw else None

    def post_multipart(
        self,
        path: str,
        fields: dict[str, str],
        files: list[tuple[str, str, bytes]],
        headers: dict | None = None,
    ) -> Any:
        body, content_type = multipart(fields, files)
        req = urllib.request.Request(
            self._url(path),
            data=body,
            method="POST",
            headers=self._headers({"Content-Type": content_type, **(headers or {})}),
        )
        _, _, raw = _request(req, self.timeout)
        return json.loads(raw)

    def download(self, url: str, target: Path) -> int:
        """Fetch a (signed) artifact URL into ``target``; returns its size."""
        req = urllib.request.Request(self._url(url), headers=self._headers())
        _, _, raw = _request(req, self.timeout)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
        return len(raw)

    def wait(self, job_id: str, timeout: float = 600, interval: float = 0.2) -> dict:
        """Poll until the job is terminal (backing off to 2 s between polls)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.json("GET", f"/v1/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "canceled"):
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(interval)
            interval = min(2.0, interval * 1.5)


def artifact_urls(result: dict) -> dict[str, str]:
    """{relative path in the generate --out layout: signed URL} for every artifact."""
    urls = {}
    for key, suffix in ARTIFACT_SUFFIXES.items():
        if key in (result.get("scene") or {}):
            urls[f"scene{suffix}"] = result["scene"][key]["url"]
    urls["manifest.json"] = result["manifest"]["url"]
    for obj in result["objects"]:
        for key, suffix in ARTIFACT_SUFFIXES.items():
            if key in obj:
                urls[f"objects/{obj['index']}{suffix}"] = obj[key]["url"]
    return urls
