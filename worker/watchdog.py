"""The consumer watchdog of a worker's main process.

Celery's consumer can lose the broker and never consume again (a Redis restart while a task
runs: the ack fails on the dead connection and the consumer stays stuck; celery#9054,
#8091), while its pool process keeps heartbeating. The watchdog, a thread in the main
process, exits the worker (code ``EXIT_STALLED``, for its supervisor to restart it) when for
``stall_s`` it held no task while messages waited in its queues (once its pool process has
said it is ready: a model loading for minutes is not a stall), or could not reach the broker
at all. Each tick it writes ``sam3d:consumer:<host>:<pid>`` (consuming or stalled, with a
TTL), which ``/readyz`` and ``sam3d-jobs healthcheck worker`` read beside the heartbeats.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from jobs.heartbeat import consumer_key, live_workers

log = logging.getLogger("sam3d.worker")

EXIT_STALLED = 75  # EX_TEMPFAIL: restart me


class ConsumerWatchdog:
    """Checks every ``interval_s`` that this worker consumes; trips ``on_stall`` once."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        queues: tuple[str, ...],
        stall_s: float,
        interval_s: float,
        ttl_s: float,
        is_busy: Callable[[], bool],
        on_stall: Callable[[str], None],
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.queues = queues
        self.stall_s = stall_s
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.is_busy = is_busy
        self.on_stall = on_stall
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.clock = clock
        self.tripped: str | None = None
        self._since: float | None = None  # when the current stall began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sam3d-watchdog", daemon=True)

    def start(self) -> ConsumerWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if not self.tripped:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(consumer_key(self.name))

    def received(self) -> None:
        """A message was taken off a queue: the consumer works."""
        self._since = None

    def check(self) -> str | None:
        """One tick: the reason this worker stalled, once it has for ``stall_s``."""
        now = self.clock()
        reason = None
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    pipe.llen(queue)
                waiting = sum(int(n) for n in pipe.execute())
            pools = [w for w in live_workers(self.client) if w.get("consumer") == self.name]
            armed = bool(pools) and all(w.get("state") in ("ready", "busy") for w in pools)
            if waiting and armed:
                reason = f"{waiting} messages wait in {', '.join(self.queues)}; none taken"
        except redis.RedisError as exc:
            reason = f"the broker is unreachable: {exc}"
        if reason is None or self.is_busy():
            self._since = None
        elif self._since is None:
            self._since = now
        stalled = self._since is not None and now - self._since >= self.stall_s
        if stalled and self.tripped is None:
            self.tripped = reason
        self._publish(reason if stalled else None)
        return self.tripped

    def _publish(self, stalled: str | None) -> None:
        state = {"state": "stalled" if stalled else "consuming", "updated_at": time.time()}
        if stalled:
            state["reason"] = stalled
        with contextlib.suppress(redis.RedisError):
            self.client.set(consumer_key(self.name), json.dumps(state), px=int(self.ttl_s * 1000))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reason = self.check()
            except Exception:  # the watchdog itself must not die quietly
                log.exception("consumer watchdog check failed")
                continue
            if reason is not None:
                log.error("worker stopped consuming (%s); exiting for a restart", reason)
                self.on_stall(reason)
                return


def exit_for_restart(grace_s: float) -> None:
    """Warm shutdown now (SIGTERM to this process); if that has not ended it within
    ``grace_s`` (a shutdown stuck on the lost broker), kill the pool and exit."""
    os.kill(os.getpid(), signal.SIGTERM)

    def force() -> None:
        time.sleep(grace_s)
        log.error("warm shutdown did not finish in %.0f s; killing the pool", grace_s)
        for pid in _children():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(EXIT_STALLED)

    threading.Thread(target=force, name="sam3d-watchdog-exit", daemon=True).start()


def _children() -> list[int]:
    """This process's child pids (Linux /proc)."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                pids.append(int(stat.parent.name))
    return pids
