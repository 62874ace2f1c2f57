"""Riding out an outage: Redis clients that retry, and calls retried with backoff."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger("sam3d")
T = TypeVar("T")

SOCKET_TIMEOUT_S = 5.0  # a frozen Redis (SIGSTOP) raises TimeoutError instead of hanging
CONNECT_TIMEOUT_S = 3.0


def backoff_delays(budget_s: float, *, base_s: float = 0.1, cap_s: float = 2.0) -> list[float]:
    """Exponential delays (doubling from ``base_s``, at most ``cap_s``) summing to about
    ``budget_s``."""
    delays: list[float] = []
    delay, total = base_s, 0.0
    while total < budget_s:
        delays.append(min(delay, cap_s))
        total += delays[-1]
        delay *= 2
    return delays


def redis_client(url: str, *, retry_s: float = 0.0) -> redis.Redis:
    """A client with socket timeouts; with ``retry_s``, each command is retried on connection
    errors and timeouts for about that long (socket timeouts not counted) before it raises."""
    retries = len(backoff_delays(retry_s, base_s=0.1, cap_s=2.0)) if retry_s > 0 else 0
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def retry_call(
    fn: Callable[[], T],
    *,
    budget_s: float,
    retry_on: tuple[type[BaseException], ...],
    what: str = "call",
    base_s: float = 0.5,
    cap_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried with jittered exponential backoff on ``retry_on`` for about
    ``budget_s``; the last failure is raised."""
    delays = backoff_delays(budget_s, base_s=base_s, cap_s=cap_s)
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            return fn()
        except retry_on as exc:
            if delay is None:
                raise
            log.warning("%s failed (attempt %d): %s; retrying in %.1f s", what, attempt, exc, delay)
            sleep(delay * random.uniform(0.8, 1.2))
    raise AssertionError("unreachable")
