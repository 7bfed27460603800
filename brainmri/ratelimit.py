"""Per-client rate limiting of the prediction endpoints: a token bucket per client address.

Every prediction costs CPU seconds (decode, screening, the CNN), so one client must not be able to
starve the others. Each client address gets a bucket of BRAINMRI_RATE_LIMIT_BURST tokens that
refills at BRAINMRI_RATE_LIMIT (e.g. ``"60/minute"``); each request to a prediction endpoint takes
one token (a batch request too: the batch size is already capped by BRAINMRI_BATCH_MAX_FILES), and
a request that finds the bucket empty gets 429 with ``Retry-After`` (whole seconds until a token is
back). Probes, pages and static files are never limited. ``None``, ``0`` or ``""`` turns it off.

The table lives in each worker process's memory, so with W gunicorn workers a client can get up to
W times the limit (each worker keeps its own buckets) unless the proxy routes a client to one
worker; that is enough to stop one client from flooding the service, and needs no Redis. The
table is bounded: a bucket that has refilled completely is the same as no bucket and is evicted,
and past BRAINMRI_RATE_LIMIT_MAX_CLIENTS the least recently seen client is dropped (it starts
again with a full bucket, so eviction can only ever be lenient, never lock anyone out).

The client is ``request.remote_addr``. Behind a reverse proxy that is the proxy's address, so every
user would share one bucket: set BRAINMRI_TRUSTED_PROXIES to the number of proxies in front of
the app, and werkzeug's ProxyFix takes the client from that many ``X-Forwarded-For`` hops. Never
set it without a proxy that overwrites the header, or clients can pick their own address.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask
from flask import current_app
from flask import request
from werkzeug.exceptions import TooManyRequests
from werkzeug.middleware.proxy_fix import ProxyFix

__all__ = [
    "EXTENSION_KEY",
    "LIMITED_ENDPOINTS",
    "RateLimiter",
    "init_app",
    "parse_rate",
    "trust_proxies",
]

EXTENSION_KEY = "brainmri.ratelimit"

# The routes that run a prediction; everything else is cheap and never limited.
LIMITED_ENDPOINTS = frozenset({"api.predict", "api.predict_batch", "pages.predict"})

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/|per)\s*(second|minute|hour)s?\s*$", re.IGNORECASE)


def parse_rate(value: object) -> float | None:
    """Tokens per second from ``"30/minute"``, ``"2/second"``, ``"100/hour"`` or an int per minute.

    Returns None (limiting off) for None, 0, False or an empty string.

    Raises:
        ValueError: any other value, so a typo fails at start-up instead of turning limiting off.
    """
    if value is None or value is False or value == "" or value == 0:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"BRAINMRI_RATE_LIMIT must not be negative: {value!r}")
        return float(value) / 60.0
    match = _RATE.match(str(value))
    if match is None:
        raise ValueError(
            f"BRAINMRI_RATE_LIMIT must look like '30/minute' (second, minute or hour): {value!r}"
        )
    count = float(match.group(1))
    return count / _PERIODS[match.group(2).lower()] if count > 0 else None


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by client address, bounded in size and safe to share between threads."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be > 0, burst and max_clients >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock  # tests replace this to move time without sleeping
        # Least recently seen first, so idle buckets are found at the front.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    @property
    def refill_seconds(self) -> float:
        """How long an empty bucket takes to become full (after that it can be forgotten)."""
        return self.burst / self.rate

    def acquire(self, key: str) -> float:
        """Take one token for `key`; return 0 if allowed, else the seconds until a token is back."""
        with self._lock:
            now = self.clock()
            self._evict_idle(now)
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_clients:
                    self._buckets.popitem(last=False)  # lenient: that client restarts full
                bucket = self._buckets[key] = _Bucket(self.burst, now)
            else:
                self._buckets.move_to_end(key)
                elapsed = max(0.0, now - bucket.updated)  # a clock never runs backwards here
                bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def _evict_idle(self, now: float) -> None:
        # Amortised O(1): the front is the least recently seen; stop at the first one still
        # refilling, since every later one was seen more recently.
        horizon = now - self.refill_seconds
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if bucket.updated > horizon:
                break
            del self._buckets[key]


def _check_rate_limit() -> None:
    """Refuse a prediction request with 429 when the client's bucket is empty."""
    if request.endpoint not in LIMITED_ENDPOINTS:
        return
    limiter: RateLimiter | None = current_app.extensions.get(EXTENSION_KEY)
    if limiter is None:
        return
    wait = limiter.acquire(request.remote_addr or "unknown")
    if wait > 0:
        # Whole seconds (RFC 9110 delay-seconds), rounded up so a retry at that time succeeds.
        raise TooManyRequests(retry_after=max(1, math.ceil(wait)))


def trust_proxies(app: Flask) -> None:
    """Wrap the WSGI app in ProxyFix when BRAINMRI_TRUSTED_PROXIES names a number of proxy hops."""
    hops = int(app.config.get("BRAINMRI_TRUSTED_PROXIES") or 0)
    if hops > 0:
        # Only X-Forwarded-For: the limiter and the logs need the client address, nothing else.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)


def init_app(app: Flask) -> None:
    """Install the limiter from BRAINMRI_RATE_LIMIT* (or nothing when off) and the proxy setting."""
    trust_proxies(app)
    rate = parse_rate(app.config.get("BRAINMRI_RATE_LIMIT"))
    if rate is None:
        return
    app.extensions[EXTENSION_KEY] = RateLimiter(
        rate,
        int(app.config.get("BRAINMRI_RATE_LIMIT_BURST") or 1),
        int(app.config.get("BRAINMRI_RATE_LIMIT_MAX_CLIENTS") or 10_000),
    )
    app.before_request(_check_rate_limit)
