"""Storage drivers: local disk with our own URL signing, and S3 against a real S3 server."""

from __future__ import annotations

import os
import stat
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest
from botocore.config import Config
from moto.server import ThreadedMotoServer

from jobs.errors import Sam3dError
from jobs.settings import Settings
from jobs.storage import (
    FileStorage,
    S3Storage,
    SignatureError,
    SignedUrl,
    Storage,
    StorageError,
    content_disposition,
    open_storage,
)
from jobs.storage import file as file_storage
from jobs.storage import s3 as s3_storage

BAD_KEYS = [
    "",
    "../x",
    "a/../../x",
    "a/..",
    "/etc/passwd",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "./a",
    ".signing-key",
    "a/.b.meta.json",
]


def url_parts(signed: SignedUrl) -> tuple[str, str, str]:
    """(key, expires, sig) as the API's /files route would take them from the URL."""
    parts = urlsplit(signed.url)
    assert parts.path.startswith("/files/")
    query = parse_qs(parts.query)
    return unquote(parts.path[len("/files/") :]), query["expires"][0], query["sig"][0]


# --------------------------------------------------------------------------- file driver


@pytest.fixture
def files(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "store")


def test_file_round_trip(files: FileStorage) -> None:
    key = "jobs/abc/objects/0.glb"
    assert not files.exists(key)
    assert files.size(key) is None
    with pytest.raises(KeyError):
        files.get(key)

    files.put(key, b"glTF-bytes", content_type="model/gltf-binary", filename="chair.glb")
    assert files.get(key) == b"glTF-bytes"
    assert files.size(key) == 10
    assert files.exists(key)
    path, content_type, filename = files.open_meta(key)
    assert path == files.root / "jobs" / "abc" / "objects" / "0.glb"
    assert path.read_bytes() == b"glTF-bytes"
    assert (content_type, filename) == ("model/gltf-binary", "chair.glb")

    files.put(key, b"v2", content_type="application/octet-stream")
    assert files.get(key) == b"v2"
    assert files.open_meta(key)[1:] == ("application/octet-stream", None)


def test_file_folders_and_sidecars_are_not_objects(files: FileStorage) -> None:
    files.put("jobs/abc/manifest.json", b"{}", content_type="application/json")
    assert not files.exists("jobs/abc")
    assert files.size("jobs") is None
    with pytest.raises(KeyError):
        files.get("jobs/abc")
    with pytest.raises(KeyError):
        files.open_meta("jobs/abc")
    names = sorted(p.name for p in (files.root / "jobs" / "abc").iterdir())
    assert names == [".manifest.json.meta.json", "manifest.json"]
    assert files.size("jobs/abc/manifest.json") == 2


def test_file_missing_sidecar_defaults(files: FileStorage) -> None:
    files.put("a/b.bin", b"x", content_type="text/plain", filename="b.txt")
    (files.root / "a" / ".b.bin.meta.json").unlink()
    assert files.open_meta("a/b.bin")[1:] == ("application/octet-stream", None)


def test_file_write_leaves_no_temp_files(files: FileStorage) -> None:
    for i in range(3):
        files.put(f"jobs/j/objects/{i}.ply", b"p" * 1000, content_type="application/x-ply")
    leftovers = [p for p in files.root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_file_failed_write_keeps_old_content(
    files: FileStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "jobs/j/scene.glb"
    files.put(key, b"old", content_type="model/gltf-binary")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_storage.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="No space left"):
        files.put(key, b"new", content_type="model/gltf-binary")
    monkeypatch.undo()
    assert files.get(key) == b"old"
    assert [p.name for p in files.root.rglob("*.tmp")] == []


def test_file_readers_never_see_partial_writes(files: FileStorage) -> None:
    key = "jobs/j/big.bin"
    payloads = [bytes([n]) * 2_000_000 for n in range(4)]
    files.put(key, payloads[0], content_type="application/octet-stream")
    stop = threading.Event()
    seen: list[bytes] = []

    def writer() -> None:
        for i in range(40):
            files.put(key, payloads[i % 4], content_type="application/octet-stream")
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        seen.append(files.get(key))
    thread.join()
    assert seen
    assert all(data in payloads for data in seen)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_file_refuses_unsafe_keys(files: FileStorage, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        files.put(key, b"evil", content_type="text/plain")
    for call in (files.get, files.size, files.exists, files.open_meta):
        with pytest.raises(ValueError):
            call(key)
    with pytest.raises(ValueError):
        files.signed_url(key, expires_in=60, base_url="http://h")
    if not key.endswith("/"):  # "a/" is a fine prefix, just not a key
        with pytest.raises(ValueError):
            files.delete_prefix(key)
    with pytest.raises(SignatureError) as info:
        files.verify(key, str(int(time.time()) + 60), "0" * 64)
    assert info.value.reason == "malformed"
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "evil").exists()


def test_file_delete_prefix(files: FileStorage) -> None:
    for i in range(5):
        files.put(f"jobs/a/objects/{i}.glb", b"g", content_type="model/gltf-binary")
    files.put("jobs/a/manifest.json", b"{}", content_type="application/json")
    files.put("jobs/ab/manifest.json", b"{}", content_type="application/json")
    files.put("jobs/b/manifest.json", b"{}", content_type="application/json")
    url = files.signed_url("jobs/b/manifest.json", expires_in=60)  # creates the signing key

    assert files.delete_prefix("jobs/a/") == 6
    assert not (files.root / "jobs" / "a").exists()  # sidecars and folders gone too
    assert files.exists("jobs/ab/manifest.json")
    with pytest.raises(KeyError):
        files.get("jobs/a/manifest.json")
    assert files.delete_prefix("jobs/a/") == 0
    assert files.delete_prefix("nothing/here/") == 0

    # A string prefix, as in S3: "jobs/a" also covers "jobs/ab/...".
    assert files.delete_prefix("jobs/a") == 1
    assert files.exists("jobs/b/manifest.json")
    assert files.delete_prefix("j") == 1
    assert sorted(p.name for p in files.root.iterdir()) == [".signing-key"]
    files.verify(*url_parts(url))


def test_file_delete_prefix_removes_orphan_sidecars(files: FileStorage) -> None:
    files.put("jobs/x/a.bin", b"1", content_type="application/octet-stream")
    (files.root / "jobs" / "x" / "a.bin").unlink()
    (files.root / "jobs" / "x" / ".b.bin.12345678.tmp").write_bytes(b"half")
    assert files.delete_prefix("jobs/x/") == 0
    assert not (files.root / "jobs").exists()


def test_file_signed_url_verifies(files: FileStorage) -> None:
    key = "jobs/abc/objects/0 final.glb"
    files.put(key, b"g", content_type="model/gltf-binary")
    before = int(time.time())
    signed = files.signed_url(key, expires_in=300, base_url="http://127.0.0.1:8000/")
    assert signed.url.startswith("http://127.0.0.1:8000/files/jobs/abc/objects/0%20final.glb?")
    assert "//files" not in signed.url
    got_key, expires, sig = url_parts(signed)
    assert got_key == key
    assert before + 300 <= int(expires) <= int(time.time()) + 300
    assert signed.expires_at == datetime.fromtimestamp(int(expires), UTC)
    assert signed.expires_at.tzinfo is not None
    assert len(sig) == 64
    files.verify(got_key, expires, sig)

    relative = files.signed_url(key, expires_in=300)
    assert relative.url.startswith("/files/jobs/abc/")


def test_file_tampering_is_refused(files: FileStorage) -> None:
    key, expires, sig = url_parts(files.signed_url("jobs/a/scene.glb", expires_in=300))
    cases = {
        "key": (("jobs/b/scene.glb", expires, sig), "bad signature"),
        "expires": ((key, str(int(expires) + 3600), sig), "bad signature"),
        "sig": ((key, expires, sig[:-1] + ("0" if sig[-1] != "0" else "1")), "bad signature"),
        "sig upper": ((key, expires, sig.upper()), "malformed"),
        "sig short": ((key, expires, sig[:32]), "malformed"),
        "expires text": ((key, "soon", sig), "malformed"),
        "expires negative": ((key, "-" + expires, sig), "malformed"),
        "expires empty": ((key, "", sig), "malformed"),
    }
    for name, (args, reason) in cases.items():
        with pytest.raises(SignatureError) as info:
            files.verify(*args)
        assert info.value.reason == reason, name


def test_file_expired_url_is_refused(files: FileStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SignatureError) as info:
        files.verify(*url_parts(files.signed_url("jobs/a/x.glb", expires_in=-1)))
    assert info.value.reason == "expired"

    now = time.time()
    parts = url_parts(files.signed_url("jobs/a/x.glb", expires_in=60))
    monkeypatch.setattr(file_storage.time, "time", lambda: now + 30)
    files.verify(*parts)
    monkeypatch.setattr(file_storage.time, "time", lambda: now + 62)
    with pytest.raises(SignatureError) as info:
        files.verify(*parts)
    assert info.value.reason == "expired"


def test_file_secret_is_persisted_and_shared(tmp_path: Path) -> None:
    first, second = FileStorage(tmp_path), FileStorage(tmp_path)
    url = first.signed_url("jobs/a/x.glb", expires_in=60)
    second.verify(*url_parts(url))
    first.verify(*url_parts(second.signed_url("jobs/a/y.glb", expires_in=60)))
    key_file = tmp_path / ".signing-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # A fresh process on the same folder (after a restart) still verifies old URLs.
    FileStorage(tmp_path).verify(*url_parts(url))
    # Another folder means another secret.
    with pytest.raises(SignatureError) as info:
        FileStorage(tmp_path / "other").verify(*url_parts(url))
    assert info.value.reason == "bad signature"


def test_file_secret_created_once_under_a_race(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)
    urls: list[SignedUrl] = []

    def start() -> None:
        store = FileStorage(tmp_path)
        barrier.wait()
        urls.append(store.signed_url("jobs/a/x.glb", expires_in=600))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    checker = FileStorage(tmp_path)
    for url in urls:
        checker.verify(*url_parts(url))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".signing-key"]


def test_file_settings_secret_overrides(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"file://{tmp_path}", signing_secret="s3cret")
    explicit = open_storage(settings)
    assert isinstance(explicit, FileStorage)
    url = explicit.signed_url("jobs/a/x.glb", expires_in=60)
    assert not (tmp_path / ".signing-key").exists()
    # Same secret elsewhere verifies; the folder's generated secret does not.
    FileStorage(tmp_path / "elsewhere", signing_secret="s3cret").verify(*url_parts(url))
    with pytest.raises(SignatureError) as info:
        FileStorage(tmp_path).verify(*url_parts(url))
    assert info.value.reason == "bad signature"


def test_file_check(tmp_path: Path) -> None:
    FileStorage(tmp_path / "new" / "dir").check()
    assert (tmp_path / "new" / "dir" / ".signing-key").exists()
    (tmp_path / "plain-file").write_bytes(b"")
    with pytest.raises(StorageError):
        FileStorage(tmp_path / "plain-file").check()
    with pytest.raises(StorageError):
        FileStorage(tmp_path / "plain-file" / "sub").put("a", b"", content_type="text/plain")


def test_content_disposition() -> None:
    assert content_disposition(None) == "inline"
    assert content_disposition("chair.glb") == 'attachment; filename="chair.glb"'
    assert content_disposition('a"b.glb') == (
        "attachment; filename=\"a'b.glb\"; filename*=UTF-8''a%22b.glb"
    )
    assert content_disposition("stuhl-ä.glb") == (
        "attachment; filename=\"stuhl-?.glb\"; filename*=UTF-8''stuhl-%C3%A4.glb"
    )
    assert "\r" not in content_disposition("x\r\nSet-Cookie: a=b")


# --------------------------------------------------------------------------- open_storage


def test_open_storage_file_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_storage(Settings(storage_url=f"file://{tmp_path}"))
    assert isinstance(store, FileStorage)
    assert isinstance(store, Storage)
    assert store.root == tmp_path.resolve()
    monkeypatch.chdir(tmp_path)
    relative = open_storage(Settings(storage_url="file://data/store"))
    assert isinstance(relative, FileStorage)
    assert relative.root == (tmp_path / "data" / "store").resolve()


def test_open_storage_s3_url() -> None:
    settings = Settings(storage_url="s3://my-bucket/some/prefix/", s3_endpoint_url="http://m:9000")
    store = open_storage(settings)
    assert isinstance(store, S3Storage)
    assert isinstance(store, Storage)
    assert (store.bucket, store.prefix) == ("my-bucket", "some/prefix")
    assert store.public_endpoint_url == "http://m:9000"


@pytest.mark.parametrize(
    "url", ["ftp://host/dir", "/just/a/path", "gs://bucket", "s3://", "s3:///prefix", "file://"]
)
def test_open_storage_refuses_bad_urls(url: str) -> None:
    with pytest.raises(Sam3dError) as info:
        open_storage(Settings(storage_url=url))
    assert info.value.code == "invalid_option"


# --------------------------------------------------------------------------- S3 driver


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server (moto) on a free port, with throwaway credentials in the env."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    admin = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )
    admin.create_bucket(Bucket=name)
    return name


def s3_settings(endpoint: str, bucket: str, prefix: str = "pre/fix", **kw: str) -> Settings:
    return Settings(storage_url=f"s3://{bucket}/{prefix}", s3_endpoint_url=endpoint, **kw)


def raw_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}),
    )


def test_s3_round_trip(s3_endpoint: str, bucket: str) -> None:
    store = open_storage(s3_settings(s3_endpoint, bucket))
    key = "jobs/abc/objects/0.glb"
    assert not store.exists(key)
    assert store.size(key) is None
    with pytest.raises(KeyError):
        store.get(key)

    store.put(key, b"glTF-bytes", content_type="model/gltf-binary", filename="chair.glb")
    assert store.get(key) == b"glTF-bytes"
    assert store.size(key) == 10
    assert store.exists(key)

    head = raw_client(s3_endpoint).head_object(Bucket=bucket, Key=f"pre/fix/{key}")
    assert head["ContentType"] == "model/gltf-binary"
    assert head["ContentDisposition"] == 'attachment; filename="chair.glb"'

    store.put("jobs/abc/manifest.json", b"{}", content_type="application/json")
    head = raw_client(s3_endpoint).head_object(Bucket=bucket, Key="pre/fix/jobs/abc/manifest.json")
    assert head["ContentDisposition"] == "inline"


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a//b", "a\\b"])
def test_s3_refuses_unsafe_keys(s3_endpoint: str, bucket: str, key: str) -> None:
    store = open_storage(s3_settings(s3_endpoint, bucket))
    with pytest.raises(ValueError):
        store.put(key, b"x", content_type="text/plain")
    with pytest.raises(ValueError):
        store.signed_url(key, expires_in=60)


def test_s3_delete_prefix_batches_and_pages(
    s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_storage, "DELETE_BATCH", 7)
    monkeypatch.setattr(s3_storage, "LIST_PAGE_SIZE", 5)
    store = open_storage(s3_settings(s3_endpoint, bucket))
    for i in range(30):
        store.put(f"jobs/a/objects/{i}.ply", b"p", content_type="application/x-ply")
    store.put("jobs/b/manifest.json", b"{}", content_type="application/json")
    raw_client(s3_endpoint).put_object(Bucket=bucket, Key="jobs/a/outside-prefix", Body=b"")

    calls: list[int] = []
    client = store._client  # count the real DeleteObjects calls
    real_delete = client.delete_objects

    def counting_delete(**kwargs: Any) -> Any:
        calls.append(len(kwargs["Delete"]["Objects"]))
        return real_delete(**kwargs)

    monkeypatch.setattr(client, "delete_objects", counting_delete)
    assert store.delete_prefix("jobs/a/") == 30
    assert calls == [7, 7, 7, 7, 2]
    assert not store.exists("jobs/a/objects/0.ply")
    assert store.exists("jobs/b/manifest.json")
    assert store.delete_prefix("jobs/a/") == 0
    # Keys outside the store's own prefix are never touched.
    listed = raw_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "jobs/a/outside-prefix",
        "pre/fix/jobs/b/manifest.json",
    ]


def test_s3_signed_url_fetches_over_http(s3_endpoint: str, bucket: str) -> None:
    store = open_storage(s3_settings(s3_endpoint, bucket))
    store.put("jobs/a/scene.glb", b"scene-bytes", content_type="model/gltf-binary")
    before = datetime.now(UTC).replace(microsecond=0)
    signed = store.signed_url("jobs/a/scene.glb", expires_in=600, base_url="http://ignored")
    assert signed.url.startswith(f"{s3_endpoint}/{bucket}/pre/fix/jobs/a/scene.glb?")
    assert 599 <= (signed.expires_at - before).total_seconds() <= 601
    with urllib.request.urlopen(signed.url, timeout=10) as response:
        assert response.read() == b"scene-bytes"
        assert response.headers["Content-Type"] == "model/gltf-binary"
        assert response.headers["Content-Disposition"] == "inline"

    named = store.signed_url("jobs/a/scene.glb", expires_in=600, filename="my scene.glb")
    with urllib.request.urlopen(named.url, timeout=10) as response:
        assert response.read() == b"scene-bytes"
        assert response.headers["Content-Disposition"] == 'attachment; filename="my scene.glb"'


def test_s3_signed_url_names_public_host(s3_endpoint: str, bucket: str) -> None:
    public = "https://assets.example.test:9443"
    store = open_storage(s3_settings(s3_endpoint, bucket, s3_public_endpoint_url=public))
    signed = store.signed_url("jobs/a/scene.glb", expires_in=900)
    parts = urlsplit(signed.url)
    assert f"{parts.scheme}://{parts.netloc}" == public
    assert parts.path == f"/{bucket}/pre/fix/jobs/a/scene.glb"
    query = parse_qs(parts.query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["900"]
    assert query["X-Amz-SignedHeaders"] == ["host"]
    assert len(query["X-Amz-Signature"][0]) == 64
    # The internal endpoint is still the one used for uploads.
    store.put("jobs/a/scene.glb", b"x", content_type="model/gltf-binary")
    assert store.get("jobs/a/scene.glb") == b"x"


def test_s3_signed_url_ttl_bounds(s3_endpoint: str, bucket: str) -> None:
    store = open_storage(s3_settings(s3_endpoint, bucket))
    for ttl in (0, -1, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            store.signed_url("jobs/a/x", expires_in=ttl)


def test_s3_check(s3_endpoint: str, bucket: str) -> None:
    open_storage(s3_settings(s3_endpoint, bucket)).check()
    missing = open_storage(s3_settings(s3_endpoint, f"{bucket}-missing"))
    with pytest.raises(StorageError):
        missing.check()
    with pytest.raises(StorageError):
        missing.get("jobs/a/x")  # NoSuchBucket is an infrastructure failure, not a KeyError
    with pytest.raises(StorageError):
        missing.put("jobs/a/x", b"x", content_type="text/plain")


def test_file_storage_never_follows_a_symlink(files: FileStorage, tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_bytes(b"not yours")
    outside_dir = tmp_path / "outside-dir"
    outside_dir.mkdir()
    files.put("jobs/a/real.bin", b"ok", content_type="application/octet-stream")
    (files.root / "jobs" / "a" / "link.bin").symlink_to(secret)
    (files.root / "jobs" / "b").symlink_to(outside_dir, target_is_directory=True)
    with pytest.raises(KeyError):
        files.get("jobs/a/link.bin")
    with pytest.raises(KeyError):
        files.open_meta("jobs/a/link.bin")
    assert files.size("jobs/a/link.bin") is None and not files.exists("jobs/a/link.bin")
    with pytest.raises(StorageError):
        files.put("jobs/b/x.bin", b"escape", content_type="application/octet-stream")
    assert list(outside_dir.iterdir()) == [] and secret.read_bytes() == b"not yours"
    assert files.get("jobs/a/real.bin") == b"ok"
