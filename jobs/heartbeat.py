"""Worker heartbeats in Redis: written by each worker, read by the API's /readyz and metrics."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from jobs.records import PREFIX


def heartbeat_key(name: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:worker:{name}"


class Heartbeat:
    """A daemon thread that refreshes ``sam3d:worker:<host>:<pid>`` with a TTL."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        interval_s: float,
        ttl_s: float,
        info: Callable[[], dict[str, Any]],
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.info = info
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.state: dict[str, Any] = {"state": "starting", "current_job": None}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sam3d-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def set(self, **fields: Any) -> None:
        """Change what the next beat says (and beat now)."""
        self.state.update(fields)
        self.beat()

    def beat(self) -> None:
        payload = {
            "name": self.name,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "updated_at": time.time(),
            **self.info(),
            **self.state,
        }
        # Redis away: the key expires and /readyz says so; the next beat tries again.
        with contextlib.suppress(redis.RedisError):
            self.client.set(
                heartbeat_key(self.name), json.dumps(payload), px=int(self.ttl_s * 1000)
            )

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(heartbeat_key(self.name))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()


def live_workers(client: redis.Redis, prefix: str = PREFIX) -> list[dict[str, Any]]:
    """Every worker whose heartbeat has not expired."""
    keys = list(client.scan_iter(match=f"{prefix}:worker:*", count=100))
    if not keys:
        return []
    return [json.loads(v) for v in client.mget(keys) if v is not None]
