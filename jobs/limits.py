"""Per-key limits in Redis: a token bucket for submits and a cap on jobs in flight."""

from __future__ import annotations

import math
import time

from jobs.errors import ErrorCode, Sam3dError
from jobs.records import JobStatus, JobStore

# KEYS[1] bucket hash; ARGV: rate/s, burst, cost, now (s). Refill, then take ``cost`` tokens
# if there are enough. Returns {allowed (0/1), seconds until enough tokens}. Atomic in Redis.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local cost, now = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, tostring(wait)}
"""


class RateLimited(Sam3dError):
    """Too many requests (``rate_limited`` or ``too_many_in_flight``); ``retry_after``
    seconds (rounded up) until one would pass."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float) -> None:
        super().__init__(code, message, retry_after=max(1, math.ceil(retry_after)))


class Limits:
    """The limits of one deployment (0 turns a limit off)."""

    def __init__(
        self, store: JobStore, *, rate_per_s: float, burst: int, max_in_flight: int
    ) -> None:
        self.store = store
        self.rate = rate_per_s
        self.burst = burst
        self.max_in_flight = max_in_flight
        self._take = store.r.register_script(_TAKE)

    def check_submit(self, owner: str, count: int = 1) -> None:
        """Raise ``RateLimited`` unless ``owner`` may submit ``count`` jobs now."""
        if self.max_in_flight:
            in_flight = self.in_flight(owner)
            if in_flight + count > self.max_in_flight:
                raise RateLimited(
                    ErrorCode.TOO_MANY_IN_FLIGHT,
                    f"{in_flight} jobs in flight for this key; the limit is {self.max_in_flight}",
                    retry_after=5,
                )
        if self.rate > 0:
            if count > self.burst:
                raise RateLimited(
                    ErrorCode.RATE_LIMITED,
                    f"{count} jobs at once exceed the burst of {self.burst}",
                    retry_after=60,
                )
            self._take_tokens(self.store.keys.submit_bucket(owner), count, "submit")

    def check_upload(self, owner: str) -> None:
        """Raise ``RateLimited`` unless ``owner`` may upload an image now (a bucket of its
        own, at the submit rate)."""
        if self.rate > 0:
            self._take_tokens(self.store.keys.upload_bucket(owner), 1, "upload")

    def _take_tokens(self, key: str, count: int, what: str) -> None:
        allowed, wait = self._take(
            keys=[key], args=[self.rate, self.burst, count, f"{time.time():.6f}"]
        )
        if not int(allowed):
            raise RateLimited(
                ErrorCode.RATE_LIMITED,
                f"{what} rate limit: {self.rate:g}/s, burst {self.burst}",
                float(wait),
            )

    def in_flight(self, owner: str) -> int:
        """Queued plus running jobs of ``owner``."""
        return self.store.count(owner, JobStatus.QUEUED, JobStatus.RUNNING)
