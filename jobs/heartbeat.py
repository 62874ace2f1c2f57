"""Worker heartbeats in Redis: written by each worker, read by the API's /readyz and metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from jobs.keys import PREFIX, Keys

log = logging.getLogger("sam3d.worker")


def heartbeat_key(name: str, prefix: str = PREFIX) -> str:
    return Keys(prefix).worker(name)


def consumer_key(name: str, prefix: str = PREFIX) -> str:
    """The consumer watchdog's state of a worker's main process (``worker/watchdog.py``)."""
    return Keys(prefix).consumer(name)


def worker_index_key(prefix: str = PREFIX) -> str:
    """Sorted set of worker names scored by when their heartbeat expires: readers find the
    live workers without scanning the keyspace."""
    return Keys(prefix).workers()


class Heartbeat:
    """A daemon thread that refreshes ``sam3d:worker:<host>:<pid>`` with a TTL."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        interval_s: float,
        ttl_s: float,
        info: Callable[[], dict[str, Any]],
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.info = info
        self.on_beat = on_beat  # periodic work of the worker (sweeps), on this thread
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
        with contextlib.suppress(redis.RedisError), self.client.pipeline() as pipe:
            pipe.set(heartbeat_key(self.name), json.dumps(payload), px=int(self.ttl_s * 1000))
            pipe.zadd(worker_index_key(), {self.name: time.time() + self.ttl_s})
            pipe.execute()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError), self.client.pipeline() as pipe:
            pipe.delete(heartbeat_key(self.name))
            pipe.zrem(worker_index_key(), self.name)
            pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception:  # a sweep failing must not stop the heartbeat
                    log.exception("periodic worker task failed")


def live_workers(client: redis.Redis, prefix: str = PREFIX) -> list[dict[str, Any]]:
    """Every worker whose heartbeat has not expired (from the index: no keyspace scan), each
    with ``consuming``: whether its main process still takes messages off the queues (its
    consumer watchdog's last word; False when that expired or says stalled)."""
    index = worker_index_key(prefix)
    with client.pipeline() as pipe:
        pipe.zremrangebyscore(index, "-inf", time.time())
        pipe.zrange(index, 0, -1)
        _, names = pipe.execute()
    if not names:
        return []
    keys = [heartbeat_key(n.decode() if isinstance(n, bytes) else n, prefix) for n in names]
    workers = [json.loads(v) for v in client.mget(keys) if v is not None]
    consumers = [w["consumer"] for w in workers if w.get("consumer")]
    raws = client.mget([consumer_key(c, prefix) for c in consumers]) if consumers else []
    states = dict(zip(consumers, raws, strict=True))
    for worker in workers:
        if not worker.get("consumer"):
            worker["consuming"] = True  # a process without a consumer (tests, older releases)
            continue
        raw = states.get(worker["consumer"])
        state = json.loads(raw) if raw else {"state": "gone"}
        worker["consuming"] = state.get("state") == "consuming"
        worker["consumer_state"] = state
    return workers


def live_worker_names(client: redis.Redis, prefix: str = PREFIX) -> set[str]:
    """Names of the workers whose heartbeat has not expired."""
    return {w["name"] for w in live_workers(client, prefix)}


def read_heartbeat(client: redis.Redis, name: str, prefix: str = PREFIX) -> dict[str, Any] | None:
    """One worker's live heartbeat, or None when it expired."""
    raw = client.get(heartbeat_key(name, prefix)) if name else None
    return json.loads(raw) if raw else None
