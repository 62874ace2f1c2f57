"""Settings: read once from the environment at start, frozen, passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from jobs.errors import ErrorCode, Sam3dError
from jobs.references import rewrite_section, section

PREFIX = "SAM3D_"
# Shown as "***" by repr(Settings), so settings can be logged; URLs lose their password.
SECRET_FIELDS = frozenset({"signing_secret", "api_keys", "webhook_secret"})
HIDDEN = "***"


def redact_url(url: str) -> str:
    """``url`` with the password of its user info (``redis://:pw@host``) replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{HIDDEN}@{host}"))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Every setting with its default; the environment variable is SAM3D_<NAME IN CAPITALS>."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = field(default_factory=lambda: f"file://{Path('data').resolve()}")
    # HMAC key for file:// URLs; unset: one is generated and kept in the storage folder.
    signing_secret: str = ""
    url_ttl_s: int = 3600
    # Base URL clients reach the API at, for links; unset: taken from each request.
    public_url: str = ""
    s3_endpoint_url: str = ""
    # Endpoint that signed S3 URLs name (SigV4 signs the host): what clients can reach.
    s3_public_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    # Comma-separated API keys; empty: no authentication (the embedded default).
    api_keys: tuple[str, ...] = ()
    max_image_bytes: int = 25_000_000
    max_image_pixels: int = 40_000_000
    max_masks: int = 64
    max_request_bytes: int = 64_000_000
    # A request body with no byte for this long: 408 and the connection closed (api/body.py);
    # nginx's client_body_timeout does the same in front. 0: wait for ever.
    body_timeout_s: float = 20.0
    allow_private_urls: bool = False
    backend: str = "inflate"
    # Turns prompts (boxes, points, text) into masks on the worker: grabcut (CPU) or sam3.
    segmenter: str = "grabcut"
    queues: tuple[str, ...] = ("interactive", "bulk")
    # A job's hard time limit: this fixed part plus object_time_limit_s per object.
    job_time_limit_s: int = 900
    # Seconds per object; 0: the backend's budget (jobs/budgets.py: inflate 10, sam3d 60).
    object_time_limit_s: float = 0.0
    # Must exceed the longest job's hard limit (max_masks objects), or a long job is
    # redelivered while it still runs; 0: that limit plus a minute.
    visibility_timeout_s: int = 0
    # Estimated output bytes of one job (options x objects); more: 422 job_too_large. 0: off.
    max_job_output_bytes: int = 10_000_000_000
    # Threads exporting, storing and recording a job's objects while the GPU generates the
    # next; 0: one per core (at most 8). Twice as many generated objects may wait for them.
    export_threads: int = 0
    # Read and decode the next queued job's inputs while this one generates (one job ahead).
    prefetch_inputs: bool = True
    # Batching across jobs (backends with generate_batch, sam3d): a worker starting a job
    # takes up to batch_jobs queued jobs with the same options into shared batched passes,
    # at most batch_max_objects objects in all (0: what the backend's memory holds), waiting
    # at most batch_wait_s for company. 1: one job at a time.
    batch_jobs: int = 8
    batch_max_objects: int = 0
    batch_wait_s: float = 0.05
    # The pool process is replaced after a job that leaves it above this (MB); 0: never.
    worker_max_memory_mb: int = 16_000
    # Records, artifacts and uploads are deleted this long after they finish; 0 keeps them.
    retention_s: int = 7 * 24 * 3600
    max_attempts: int = 3
    heartbeat_interval_s: float = 5.0
    heartbeat_ttl_s: float = 20.0
    # A worker's Redis commands are retried this long through a restart or a freeze.
    redis_retry_s: float = 60.0
    # A job's storage reads and writes are retried this long through an outage (S3 down).
    storage_retry_s: float = 120.0
    # The worker's main process exits (code 75, for its supervisor to restart it) after this
    # long idle while messages wait in its queues, or while the broker is unreachable.
    consumer_stall_s: float = 20.0
    # Webhooks: HMAC-SHA256 key, retries with exponential backoff from the 'webhooks' queue.
    webhook_secret: str = ""
    webhook_max_attempts: int = 8
    webhook_retry_base_s: float = 2.0
    webhook_timeout_s: float = 10.0
    # Per API key: submits per second (token bucket; 0 = unlimited), burst, jobs in flight.
    submit_rate_per_s: float = 0.0
    submit_burst: int = 50
    max_in_flight: int = 0
    max_batch_jobs: int = 100
    # POST /sam3_3d/infer (Roboflow's synchronous route): how long a request waits for its job.
    sync_timeout_s: int = 600
    # The GPU workers have requirements/gpu-baking.txt (non-commercial): Roboflow-style requests'
    # with_texture_baking / with_mesh_postprocess are honoured only then.
    baking_available: bool = False
    log_format: str = "text"  # text, or json (one object per line, job id on each)
    log_level: str = "INFO"
    # Let Flower see workers: task events and remote control (off: less Redis traffic).
    celery_events: bool = False
    # The real model (backend "sam3d").
    checkpoint_dir: str = ""  # pipeline.yaml and the weights
    min_free_gpu_gb: float = 32.0
    # auto: flash_attn where installed, else varlen (PyTorch's variable-length kernel); or
    # flash_attn, xformers, sdpa (upstream's dense-mask fallback: slow, quadratic memory).
    attn_backend: str = "auto"
    compile_model: bool = False  # upstream's torch.compile (max-autotune)
    # Ours: stage 1's flow blocks under torch.compile, compiled in the worker's set-up
    # (worker/backends/sam3d/flow_compile.py; measured: docs/perf/2026-12-04-sam3d-knobs.md).
    compile_flow: bool = True
    dinov2_dir: str = ""  # a local torch hub folder of facebookresearch/dinov2 (offline hosts)
    moge_path: str = ""  # MoGe's model.pt, instead of the path (or hub id) in pipeline.yaml
    # All objects of an image go through SAM 3D in batches: at most this many (0: as many as
    # the free GPU memory holds, at gpu_gb_per_object each beyond gpu_reserve_gb).
    max_batch_objects: int = 0
    batch_objects: bool = True  # false: upstream's run() once per mask (for comparison)
    gpu_gb_per_object: float = 1.0  # measured +0.2 GB per ~25k-voxel object: room to spare
    # The decoders' working memory (~7 GB over a one-object job's peak, 8 objects, 2 streams).
    gpu_reserve_gb: float = 8.0
    cfg_pairs: bool = True  # a guided flow step's two halves in one backbone call
    postprocess_threads: int = 4  # CPU threads for upstream's GLB conversion and ours
    decoder_streams: int = 2  # mesh-decoder tails side by side, each on its own CUDA stream
    # SAM 3 (segmenter "sam3"): its checkpoint (sam3.pt; empty: random weights, for benches
    # only, refused unless sam3_random_weights) and CLIP's BPE vocabulary (empty: the one
    # open_clip_torch ships).
    sam3_checkpoint: str = ""
    sam3_bpe_path: str = ""
    sam3_random_weights: bool = False
    sam3_device: str = "auto"  # auto: cuda when available, else cpu
    # module:function(settings, bpe_path, device) -> model, instead of sam3's own builder
    # (a fine-tuned variant; the tests' reduced model).
    sam3_builder: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from ``env`` (default ``os.environ``); bad values are refused by name."""
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            key = PREFIX + f.name.upper()
            if key not in env:
                continue
            raw = env[key]
            try:
                if f.type == "int":
                    values[f.name] = int(raw)
                elif f.type == "float":
                    values[f.name] = float(raw)
                elif f.type == "bool":
                    values[f.name] = _bool(raw)
                elif f.type.startswith("tuple"):
                    values[f.name] = _list(raw)
                else:
                    values[f.name] = raw
            except ValueError as exc:
                raise Sam3dError(ErrorCode.INVALID_OPTION, f"setting {key}: {exc}") from None
        values.update(overrides)
        settings = cls(**values)
        longest = settings.longest_job_s()
        if settings.visibility_timeout_s and settings.visibility_timeout_s <= longest:
            raise Sam3dError(
                ErrorCode.INVALID_OPTION,
                f"{PREFIX}VISIBILITY_TIMEOUT_S ({settings.visibility_timeout_s}) must exceed "
                f"the longest job's time limit ({longest} s: {PREFIX}JOB_TIME_LIMIT_S plus "
                f"{PREFIX}MAX_MASKS objects at the per-object budget)",
            )
        return settings

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = HIDDEN
            elif isinstance(value, str) and "://" in value:
                value = redact_url(value)
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def longest_job_s(self) -> int:
        """The hard time limit of a job with ``max_masks`` objects."""
        from jobs.budgets import max_time_limit_s

        return max_time_limit_s(self)

    def broker_visibility_timeout_s(self) -> int:
        """The Redis visibility timeout: as set, or a minute above the longest job."""
        return self.visibility_timeout_s or self.longest_job_s() + 60

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings (for child processes)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[PREFIX + f.name.upper()] = str(value)
        return env


# The settings reference (docs/operations.md), generated by ``python -m jobs.settings``: one
# line per setting; tests/test_settings.py fails when a setting has none or the file is stale.
MEANINGS: dict[str, str] = {
    "redis_url": "broker and job records",
    "storage_url": "`file:///dir` or `s3://bucket/prefix`",
    "signing_secret": "HMAC key of `file://` URLs",
    "url_ttl_s": "lifetime of signed URLs",
    "public_url": "base URL clients reach the API at",
    "s3_endpoint_url": "S3-compatible endpoint the service talks to (MinIO, R2)",
    "s3_public_endpoint_url": "endpoint signed URLs name: SigV4 signs the host, so it must be "
    "the one clients reach",
    "s3_region": "S3 region; credentials come from the usual `AWS_*` variables",
    "api_keys": "comma-separated keys; a job is visible only to its key",
    "max_image_bytes": "image size limit",
    "max_image_pixels": "pixel limit (checked from the header)",
    "max_masks": "objects per job",
    "max_request_bytes": "request body limit: 413 `request_too_large`, with a Content-Length "
    "or chunked",
    "body_timeout_s": "a request body with no byte for this long: 408 `request_timeout`, "
    "connection closed (0: wait for ever)",
    "allow_private_urls": "let image, depth and webhook URLs reach private, loopback and "
    "link-local addresses",
    "backend": "backend whose options the API validates, and the worker's default",
    "segmenter": "prompts to masks: `grabcut` (CPU) or `sam3` (GPU); the API refuses kinds it "
    "cannot read",
    "queues": "the queues a worker consumes when `sam3d-jobs worker` has no `--queues`",
    "job_time_limit_s": "fixed part of a job's hard time limit (soft limit: up to 30 s earlier)",
    "object_time_limit_s": "added to the limit per object",
    "visibility_timeout_s": "Redis visibility timeout; must exceed the longest job's hard limit "
    "(`SAM3D_MAX_MASKS` objects)",
    "max_job_output_bytes": "estimated output of one job (options x objects); over it: 422 "
    "`job_too_large`; 0: off",
    "export_threads": "threads exporting, storing and recording a job's objects while the GPU "
    "generates the next; twice as many generated objects may wait for them",
    "prefetch_inputs": "read and decode the next queued job's inputs (and first masks) while "
    "one generates",
    "batch_jobs": "`sam3d`: queued jobs with the same options a worker runs together in shared "
    "batched passes; 1: one job at a time",
    "batch_max_objects": "`sam3d`: objects of all jobs in one cross-job batch; 0: what the free "
    "GPU memory holds",
    "batch_wait_s": "how long a batch waits for company when fewer jobs are queued",
    "worker_max_memory_mb": "the pool process is replaced after a job that leaves it above "
    "this; 0: never",
    "retention_s": "records, artifacts and uploads deleted this long after they finish; 0 "
    "keeps them",
    "max_attempts": "starts before a job whose workers die is failed",
    "heartbeat_interval_s": "worker heartbeat period",
    "heartbeat_ttl_s": "a worker unheard of for this long is gone (its jobs are reaped)",
    "redis_retry_s": "a worker's Redis commands are retried this long through a restart or freeze",
    "storage_retry_s": "a job's storage reads and writes are retried this long",
    "consumer_stall_s": "a worker idle this long while messages wait (or Redis is unreachable) "
    "exits 75 for a restart",
    "webhook_secret": "HMAC key that signs webhooks; webhooks are refused without it",
    "webhook_max_attempts": "deliveries tried before `failed`",
    "webhook_retry_base_s": "first retry delay; doubles each time (at most 600 s)",
    "webhook_timeout_s": "per delivery attempt, the whole of it (a receiver that trickles its "
    "answer is cut off); redirects are not followed",
    "submit_rate_per_s": "submits per second per key (token bucket)",
    "submit_burst": "bucket size",
    "max_in_flight": "queued + running jobs per key",
    "max_batch_jobs": "jobs per batch",
    "sync_timeout_s": "how long `POST /sam3_3d/infer` waits for its job (then 504; the job "
    "goes on)",
    "baking_available": "the GPU workers have `requirements/gpu-baking.txt`: Roboflow-style "
    "`with_texture_baking`/`with_mesh_postprocess` are honoured",
    "log_format": "`text`, or `json`: one object per line with `job_id` (the images use it)",
    "log_level": "the services' log level",
    "celery_events": "task events and remote control, for Flower",
    "checkpoint_dir": "`sam3d`: the folder with `pipeline.yaml` and the weights",
    "min_free_gpu_gb": "`sam3d`: GPU memory a worker needs free to start",
    "attn_backend": "`sam3d`: `auto` (flash_attn where installed, else `varlen`), `varlen`, "
    "`flash_attn`, `xformers` or `sdpa`",
    "compile_model": "`sam3d`: upstream's own torch.compile (max-autotune; slow to warm up)",
    "compile_flow": "`sam3d`: stage 1's flow blocks under torch.compile, compiled in the "
    "worker's set-up",
    "dinov2_dir": "`sam3d`: a local torch hub folder of facebookresearch/dinov2 (offline hosts)",
    "moge_path": "`sam3d`: MoGe's `model.pt`, instead of the path (or hub id) in pipeline.yaml",
    "max_batch_objects": "`sam3d`: objects per batch; 0: as many as the free GPU memory holds",
    "batch_objects": "`sam3d`: all objects of an image in batches; false: upstream's run() "
    "once per mask",
    "gpu_gb_per_object": "`sam3d`: GPU memory an object of a batch takes (chunk size)",
    "gpu_reserve_gb": "`sam3d`: GPU memory kept for the decoders' working memory",
    "cfg_pairs": "`sam3d`: a guided flow step's two halves in one backbone call",
    "postprocess_threads": "`sam3d`: CPU threads for upstream's GLB conversion and ours",
    "decoder_streams": "`sam3d`: mesh-decoder tails side by side, each on its own CUDA stream",
    "sam3_checkpoint": "`sam3`: its weights (`sam3.pt`)",
    "sam3_bpe_path": "`sam3`: CLIP's BPE vocabulary",
    "sam3_random_weights": "`sam3`: random weights (benches only)",
    "sam3_device": "`sam3`: `cuda`, `cpu` or `auto`",
    "sam3_builder": "`sam3`: `module:function(settings, bpe_path, device)` building the model "
    "instead of sam3's own",
}
# Where the value alone would mislead: what an empty or zero default means.
DEFAULT_SHOWN: dict[str, str] = {
    "storage_url": "`file://$PWD/data`",
    "signing_secret": "(generated, kept in `<dir>/.signing-key`)",
    "public_url": "(from each request)",
    "s3_endpoint_url": "(AWS)",
    "s3_public_endpoint_url": "(= endpoint)",
    "api_keys": "(empty: no auth)",
    "object_time_limit_s": "`0` (the backend's: `inflate` 10, `sam3d` 60)",
    "visibility_timeout_s": "`0` (the longest job + 60 s)",
    "export_threads": "`0` (one per core, at most 8)",
    "retention_s": "`604800` (a week)",
    "webhook_secret": "(none; `dev` makes one and prints it)",
    "submit_rate_per_s": "`0` (off)",
    "max_in_flight": "`0` (off)",
    "sam3_bpe_path": "(open_clip's)",
    "max_batch_objects": "`0` (what the memory holds)",
    "batch_max_objects": "`0` (what the memory holds)",
}
REFERENCE_BEGIN = "<!-- settings: generated by `python -m jobs.settings` from jobs/settings.py -->"
REFERENCE_END = "<!-- end of settings -->"
REFERENCE_FILE = "docs/operations.md"


def _shown_default(f) -> str:
    if f.name in DEFAULT_SHOWN:
        return DEFAULT_SHOWN[f.name]
    value = f.default
    if isinstance(value, tuple):
        value = ",".join(value)
    elif isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`" if value != "" else "(none)"


def reference_table() -> str:
    """Every setting as a Markdown table: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        rows.append(f"| `{PREFIX}{f.name.upper()}` | {_shown_default(f)} | {MEANINGS[f.name]} |")
    return "\n".join(rows)


def reference_section() -> str:
    return section(REFERENCE_BEGIN, reference_table(), REFERENCE_END)


if __name__ == "__main__":
    rewrite_section(REFERENCE_FILE, REFERENCE_BEGIN, REFERENCE_END, reference_table())
