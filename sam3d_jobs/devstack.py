"""The embedded stack: a private Redis, the API and CPU workers, as child processes.

Used by ``sam3d-jobs dev``, ``sam3d-jobs demo`` and the service tests. Every child runs in
its own process group, so stopping the stack leaves no process behind (Celery's pool
processes included).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from jobs.redis_server import RedisServer, free_port
from jobs.settings import Settings

EXIT_RESTART = 75  # a worker's consumer watchdog tripped (worker/watchdog.py EXIT_STALLED)


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
    """Signal the child's whole process group; SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        proc.wait()


class DevStack:
    """Redis + API + workers on this machine; ``with DevStack(...) as stack: stack.url``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        backend: str = "inflate",
        workers: int = 1,
        settings: Settings | None = None,
        log_dir: Path | None = None,
        api_workers: int = 2,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.backend = backend
        self.initial_workers = workers
        self.base_settings = settings or Settings()
        self.log_dir = Path(log_dir or self.data_dir / "logs")
        self.api_workers = api_workers
        self.extra_env = dict(extra_env or {})
        self.redis = RedisServer(self.data_dir / "redis")
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.webhooks: subprocess.Popen | None = None
        # pid -> (args, env), to restart it
        self._worker_args: dict[int, tuple[list[str], dict[str, str] | None]] = {}
        self.restarts = 0
        self.settings: Settings | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # lifecycle
    def start(self, timeout: float = 60.0, wait: bool = True) -> DevStack:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        storage = self.base_settings.storage_url
        if storage == Settings().storage_url:  # the default: keep files inside data_dir
            storage = f"file://{self.data_dir / 'storage'}"
        self.settings = replace(
            self.base_settings,
            redis_url=self.redis.url,
            storage_url=storage,
            public_url=self.base_settings.public_url or self.url,
            # Webhooks are signed; a local stack gets a fresh key unless one is given.
            webhook_secret=self.base_settings.webhook_secret or secrets.token_hex(32),
            backend="inflate" if ":" in self.backend else self.backend,
        )
        try:
            self.api = self._spawn(
                [
                    "api",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self.api_workers),
                ],
                "api",
            )
            for _ in range(self.initial_workers):
                self.start_worker()
            self.webhooks = self._spawn(["webhooks", "--concurrency", "4"], "webhooks")
            self.wait_ready(timeout, path="/readyz" if wait else "/healthz")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(
        self, args: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        env = {
            **os.environ,
            **self.settings.to_env(),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **(env or {}),
        }
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "sam3d_jobs.cli", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def start_worker(
        self,
        backend: str | None = None,
        queues: str | None = None,
        gpu: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """One more worker; ``env`` overrides settings for it alone."""
        args = ["worker", "--backend", backend or self.backend]
        if queues:
            args += ["--queues", queues]
        if gpu is not None:
            args += ["--gpu", str(gpu)]
        proc = self._spawn(args, f"worker-{len(self.workers)}", env)
        self.workers.append(proc)
        self._worker_args[proc.pid] = (args, env)
        return proc

    def supervise(self) -> list[subprocess.Popen]:
        """Restart every worker that exited asking for it (its consumer watchdog's code 75),
        as a container's restart policy would; returns the new processes."""
        restarted = []
        for proc in list(self.workers):
            if proc.poll() == EXIT_RESTART:
                self.workers.remove(proc)
                args, env = self._worker_args.pop(proc.pid)
                new = self._spawn(args, f"worker-{len(self.workers)}", env)
                self.workers.append(new)
                self._worker_args[new.pid] = (args, env)
                self.restarts += 1
                restarted.append(new)
        return restarted

    def kill_worker(self, proc: subprocess.Popen) -> None:
        """SIGKILL a worker and its pool process at once: no warm shutdown, no ack."""
        _stop_group(proc, signal.SIGKILL)
        self.workers.remove(proc)

    def stop_worker(self, proc: subprocess.Popen) -> None:
        """Warm shutdown (SIGTERM): the worker finishes its job, then exits."""
        if proc in self.workers:
            _stop_group(proc, signal.SIGTERM, timeout=10)
            self.workers.remove(proc)

    def wait_ready(self, timeout: float = 60.0, path: str = "/readyz") -> dict:
        """Block until /readyz answers 200 (Redis, storage and a worker are up); with
        ``path="/healthz"``, until the API answers at all."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            for proc in [self.api, self.webhooks, *self.workers]:
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"a stack process exited early; see {self.log_dir}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                last = exc.read()[:500]
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"stack not ready after {timeout} s: {last!r}; see {self.log_dir}")

    def stop(self) -> None:
        for proc in self.workers:
            _stop_group(proc, signal.SIGTERM, timeout=5)
        for proc in (self.api, self.webhooks):
            if proc is not None:
                _stop_group(proc, signal.SIGTERM, timeout=5)
        self.redis.stop()

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_dev(port: int, data_dir: Path, backend: str, workers: int) -> int:
    """``sam3d-jobs dev``: start the stack, print its URL, stop everything on Ctrl-C/SIGTERM."""
    # The caller's SAM3D_* settings (API keys, limits, storage) hold for the whole stack.
    settings = Settings.from_env()
    stack = DevStack(data_dir, port=port, backend=backend, workers=workers, settings=settings)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack.start()
    print(f"sam3d-jobs dev stack ready at {stack.url}", flush=True)
    print(f"  data: {stack.data_dir}   logs: {stack.log_dir}", flush=True)
    print(f"  webhook signing secret: {stack.settings.webhook_secret}", flush=True)
    print("  Ctrl-C stops it.", flush=True)
    try:
        while not stopping:
            for proc in stack.supervise():
                print(f"restarted a stalled worker (pid {proc.pid})", flush=True)
            if any(p.poll() is not None for p in [stack.api, stack.webhooks, *stack.workers]):
                print(f"a stack process exited; see {stack.log_dir}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    finally:
        print("stopping...", flush=True)
        stack.stop()
