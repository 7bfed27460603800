"""Per-client rate limiting of the prediction endpoints (Flask-Limiter): a token bucket per address.

Every prediction costs CPU seconds (decode, screening, the CNN), so one client must not be able to
starve the others. Each client address gets a bucket of BRAINMRI_RATE_LIMIT_BURST tokens that
refills at BRAINMRI_RATE_LIMIT (e.g. ``"60/minute"``); each request to a prediction endpoint takes
one token (a batch request too: the batch size is already capped by BRAINMRI_BATCH_MAX_FILES), and
a request that finds the bucket empty gets 429 with ``Retry-After`` (whole seconds until a token is
back). The three prediction routes share one bucket per client. Probes, pages and static files
are never limited. ``None``, ``0`` or ``""`` turns it off.

Flask-Limiter does the request side: the key function, which routes count, storage URIs and
connections, and falling back when the storage fails. Its storage library (``limits``) offers
fixed windows, moving windows and sliding-window counters, none of which has a burst separate
from the rate or can say how long until the next request is allowed, so this module adds one
strategy: GCRA, the exact "virtual scheduling" form of a token bucket. A bucket is one number,
its theoretical arrival time (TAT); a request is allowed when ``max(TAT, now) + cost·T - burst·T
<= now`` (T = seconds per token), which then becomes the new TAT. The same arithmetic runs in
``RateLimiter`` (in process) and in a Lua script in Redis (atomic for all workers and hosts).

Where the buckets live is RATELIMIT_STORAGE_URI (``FLASK_RATELIMIT_STORAGE_URI``):

* ``memory://`` (the default): each worker process keeps its own table, so with W gunicorn
  workers a client can get up to W times the limit. Nothing to run. The table is bounded: a
  bucket that has refilled completely is the same as no bucket and is evicted, and past
  BRAINMRI_RATE_LIMIT_MAX_CLIENTS the least recently seen client is dropped (it starts again with
  a full bucket, so eviction can only ever be lenient, never lock anyone out).
* ``redis://host:6379/0`` (or ``rediss://``, ``redis+sentinel://``, ``redis+cluster://``): one
  bucket per client for every worker on every host. Time comes from each host's wall clock
  (keep them in NTP sync; a skew of d seconds moves a bucket by d seconds).

If Redis cannot be reached the app fails *open to per-worker limits*: each worker switches to
its own in-memory buckets (Flask-Limiter's in-memory fallback), logs a warning, keeps answering
and keeps limiting (as with ``memory://``), and checks Redis again with backoff (1, 2, 4, ... 32 s)
until it answers. Failing closed would turn a Redis outage into a prediction outage, for a
limiter that protects CPU, not data; failing open without a fallback would leave a flood during
the outage unlimited. Redis calls time out after RATELIMIT_STORAGE_TIMEOUT seconds so that an
unreachable host (not just a refused port) cannot hang requests.

The client is ``request.remote_addr``. Behind a reverse proxy that is the proxy's address, so every
user would share one bucket: set BRAINMRI_TRUSTED_PROXIES to the number of proxies in front of
the app, and werkzeug's ProxyFix takes the client from that many ``X-Forwarded-For`` hops. Never
set it without a proxy that overwrites the header, or clients can pick their own address.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from fractions import Fraction
from typing import Any
from typing import Protocol

from flask import Flask
from flask import current_app
from flask import request
from flask.typing import ResponseReturnValue
from flask_limiter import ApplicationLimit
from flask_limiter import Limiter
from flask_limiter import RateLimitExceeded
from limits import RateLimitItem
from limits import WindowStats
from limits.storage import MemoryStorage
from limits.storage import RedisStorage
from limits.storage import Storage
from limits.strategies import RateLimiter as Strategy
from werkzeug.middleware.proxy_fix import ProxyFix

__all__ = [
    "EXTENSION_KEY",
    "LIMITED_ENDPOINTS",
    "LIMITER_KEY",
    "STORAGE_SCHEMES",
    "BucketLimiter",
    "RateLimiter",
    "RedisBuckets",
    "TokenBucket",
    "gcra",
    "init_app",
    "limit_string",
    "parse_rate",
    "trust_proxies",
]

# The name it had before the web/ package, so log configuration that names it still works.
log = logging.getLogger("brainmri.ratelimit")

# app.extensions keys: the bucket store the limits are counted in (RateLimiter or RedisBuckets),
# and the Flask-Limiter extension that applies them.
EXTENSION_KEY = "brainmri.ratelimit"
LIMITER_KEY = "brainmri.limiter"

# The routes that run a prediction; everything else is cheap and never limited.
LIMITED_ENDPOINTS = frozenset({"api.predict", "api.predict_batch", "pages.predict",
                               "api.studies_endpoint", "studies.study_page"})

# One bucket per client for all three routes (Flask-Limiter "application limit" scope).
_SCOPE = "predict"

# RATELIMIT_STORAGE_URI schemes the token bucket runs on (limits' memory and Redis storages).
STORAGE_SCHEMES = frozenset(
    {"memory", "redis", "rediss", "redis+unix", "redis+sentinel", "redis+cluster"}
)

_PERIODS = {"second": 1, "minute": 60, "hour": 3600}
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


def limit_string(rate: float) -> str:
    """The rate in Flask-Limiter's notation (``"60/minute"``): the limit's name and storage key.

    The bucket store holds the exact rate; this only has to be stable and readable, so a rate
    with no whole count per second, minute, hour or day is rounded to a whole count per day.
    """
    exact = Fraction(rate).limit_denominator(1_000_000)
    for name, seconds in (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400)):
        count = exact * seconds
        if count.denominator == 1 and count >= 1:
            return f"{count.numerator}/{name}"
    return f"{max(1, round(rate * 86400))}/day"


# Seconds below which two times are the same instant (the Redis script stores microseconds).
TIME_EPSILON = 1e-6


def gcra(tat: float | None, now: float, interval: float, burst: float,
         cost: int = 1) -> tuple[float | None, float]:
    """One GCRA decision: (the bucket's new TAT, 0.0) if allowed, else (None, seconds to wait).

    Args:
        tat: the bucket's theoretical arrival time, None for a client never seen (full bucket).
        now: the current time on the same clock.
        interval: seconds per token (1 / rate).
        burst: tokens a full bucket holds.
        cost: tokens this request takes.
    """
    start = now if tat is None else max(tat, now)
    new_tat = start + cost * interval
    allow_at = new_tat - burst * interval
    # Within a microsecond counts as now: (now + 3600) - 3600 can come out one ulp above now,
    # which refused a new client's first request (burst 1, 1/hour) about one time in three.
    if allow_at - now > TIME_EPSILON:
        return None, allow_at - now
    return new_tat, 0.0


def _peek(tat: float | None, now: float, interval: float, burst: float) -> tuple[float, int]:
    """(seconds until one token is back, whole tokens left) for a bucket, without taking any."""
    start = now if tat is None else max(tat, now)
    wait = max(0.0, start + interval - burst * interval - now)
    # The epsilon keeps 2.9999999999 tokens (float TATs) from reading as 2.
    tokens = burst - (start - now) / interval
    return wait, max(0, math.floor(tokens + 1e-9))


class Buckets(Protocol):
    """Where buckets are counted: in this process (RateLimiter) or in Redis (RedisBuckets)."""

    clock: Callable[[], float]

    def acquire(self, key: str, cost: int = 1) -> float:
        """Take `cost` tokens; 0 if allowed, else the seconds until they are back."""

    def peek(self, key: str) -> tuple[float, int]:
        """Seconds until one token is back, and whole tokens left."""

    def clear(self, key: str) -> None:
        """Forget the bucket (it is full again)."""


class RateLimiter:
    """GCRA token buckets keyed by client address, in memory, bounded and thread-safe."""

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
        self.interval = 1.0 / rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock  # tests replace this to move time without sleeping
        # Client -> TAT, least recently seen first, so idle buckets are found at the front.
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tats)

    @property
    def refill_seconds(self) -> float:
        """How long an empty bucket takes to become full (after that it can be forgotten)."""
        return self.burst / self.rate

    def acquire(self, key: str, cost: int = 1) -> float:
        """Take `cost` tokens for `key`; return 0 if allowed, else the seconds until they are back."""
        with self._lock:
            now = self.clock()
            self._evict_idle(now)
            tat = self._tats.get(key)
            if tat is None:
                if len(self._tats) >= self.max_clients:
                    self._tats.popitem(last=False)  # lenient: that client restarts full
            else:
                self._tats.move_to_end(key)
            new_tat, wait = gcra(tat, now, self.interval, self.burst, cost)
            if new_tat is not None:
                self._tats[key] = new_tat
            return wait

    def peek(self, key: str) -> tuple[float, int]:
        """Seconds until one token is back for `key`, and whole tokens left (takes none)."""
        with self._lock:
            return _peek(self._tats.get(key), self.clock(), self.interval, self.burst)

    def clear(self, key: str) -> None:
        """Forget `key`'s bucket."""
        with self._lock:
            self._tats.pop(key, None)

    def _evict_idle(self, now: float) -> None:
        # Amortised O(1): a TAT in the past is a full bucket. Stop at the first one still
        # refilling; a full one behind it stays until it reaches the front (or is pushed out by
        # max_clients), which is harmless since a full bucket and no bucket answer alike.
        while self._tats:
            key, tat = next(iter(self._tats.items()))
            if tat > now:
                break
            del self._tats[key]


# GCRA in one atomic step for every worker and host: the same arithmetic as gcra() above.
# The TAT is stored as text with microseconds (Lua numbers would reach Redis as integers) and
# expires when the bucket is full again, so idle clients cost Redis nothing. The epsilon is
# gcra()'s TIME_EPSILON, written in from the constant so that the two cannot drift apart.
_GCRA_LUA = f"local epsilon = {TIME_EPSILON!r}" + """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local stored = redis.call('GET', KEYS[1])
local start = now
if stored then
  start = math.max(tonumber(stored), now)
end
local new_tat = start + cost * interval
local allow_at = new_tat - burst * interval
if allow_at - now > epsilon then
  return {0, string.format('%.6f', allow_at - now)}
end
local ttl_ms = math.max(1, math.ceil((new_tat - now) * 1000))
redis.call('SET', KEYS[1], string.format('%.6f', new_tat), 'PX', ttl_ms)
return {1, '0'}
"""


class RedisBuckets:
    """GCRA token buckets in Redis, shared by every worker and host that uses the same server."""

    def __init__(self, client: Any, rate: float, burst: int, prefix: str = "LIMITS",
                 clock: Callable[[], float] = time.time) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0, burst >= 1")
        self.client = client
        self.rate = rate
        self.interval = 1.0 / rate
        self.burst = float(burst)
        self.prefix = prefix
        # Wall-clock time, not monotonic: every host must read the same clock.
        self.clock = clock
        # redis-py sends EVALSHA and reloads the script if the server lost it (a restart).
        self._script = client.register_script(_GCRA_LUA)
        self.unreachable = False  # for logging each outage once, and its end

    def _key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    def acquire(self, key: str, cost: int = 1) -> float:
        """Take `cost` tokens for `key` atomically; 0 if allowed, else the seconds to wait."""
        try:
            allowed, wait = self._script(
                keys=[self._key(key)],
                args=[f"{self.clock():.6f}", repr(self.interval), repr(self.burst), cost],
            )
        except Exception as exc:  # re-raised: Flask-Limiter then falls back to memory
            # Flask-Limiter calls the shared store again only once it answers a ping, so this
            # logs once per outage. Its own logger has no handler here, so say it in ours.
            if not self.unreachable:
                log.warning("rate limit store (Redis) unreachable (%s): each worker limits on "
                            "its own until it answers again", type(exc).__name__)
            self.unreachable = True
            raise
        if self.unreachable:
            self.unreachable = False
            log.warning("rate limit store (Redis) answers again: limits are shared again")
        return 0.0 if int(allowed) else float(wait)

    def peek(self, key: str) -> tuple[float, int]:
        """Seconds until one token is back for `key`, and whole tokens left (takes none)."""
        stored = self.client.get(self._key(key))
        tat = None if stored is None else float(stored)
        return _peek(tat, self.clock(), self.interval, self.burst)

    def clear(self, key: str) -> None:
        """Forget `key`'s bucket."""
        self.client.delete(self._key(key))


class TokenBucket(Strategy):
    """A `limits` strategy that counts in a bucket store (Flask-Limiter calls hit/test/stats)."""

    def __init__(self, storage: Storage, buckets: Buckets) -> None:
        super().__init__(storage)
        self.buckets = buckets

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """Take `cost` tokens from the bucket of `identifiers`; False when it has too few."""
        return self.buckets.acquire(item.key_for(*identifiers), cost) == 0

    def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        """True when the bucket holds at least `cost` tokens (none are taken)."""
        return self.buckets.peek(item.key_for(*identifiers))[1] >= cost

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        """When (epoch seconds) the next token is back, and whole tokens left."""
        wait, remaining = self.buckets.peek(item.key_for(*identifiers))
        return WindowStats(time.time() + wait, remaining)

    def retry_after(self, item: RateLimitItem, *identifiers: str) -> float:
        """Seconds until the bucket of `identifiers` has a token again."""
        return self.buckets.peek(item.key_for(*identifiers))[0]

    def clear(self, item: RateLimitItem, *identifiers: str) -> None:
        """Refill the bucket of `identifiers`."""
        self.buckets.clear(item.key_for(*identifiers))


class BucketLimiter(Limiter):
    """Flask-Limiter counting in token buckets, on its storage and on its in-memory fallback."""

    def __init__(self, key_func: Callable[[], str], buckets_for: Callable[[Storage], Buckets],
                 **options: Any) -> None:
        super().__init__(key_func, **options)
        self.buckets_for = buckets_for
        self.buckets: Buckets | None = None

    def init_app(self, app: Flask) -> None:
        """Set up Flask-Limiter, then swap its window strategy for the token bucket."""
        super().init_app(app)
        if not self.enabled:  # RATELIMIT_ENABLED=false: Flask-Limiter set nothing up
            return
        # Flask-Limiter builds its strategies by name from `limits`, which has no token bucket;
        # the storages it connected (from RATELIMIT_STORAGE_URI, and the in-memory fallback)
        # are reused as they are.
        self.buckets = self.buckets_for(self.storage)
        self._limiter = TokenBucket(self.storage, self.buckets)
        if self._fallback_limiter is not None:
            fallback = self._fallback_storage
            self._fallback_limiter = TokenBucket(fallback, self.buckets_for(fallback))

    def _check_request_limit(self, callable_name: str | None = None,
                             in_middleware: bool = True) -> None:
        """Flask-Limiter's check, with a store error always counted in the in-memory fallback.

        Flask-Limiter switches a worker to the fallback on the first store error. A second
        thread whose Redis call was already failing at that moment would, in Flask-Limiter,
        answer 500 or (with swallow_errors) pass uncounted: with 2 gthread threads per worker
        that let up to one extra request per worker through each time Redis went away. Here
        that request is counted in the fallback like every later one.
        """
        try:
            super()._check_request_limit(callable_name, in_middleware)
            return
        except RateLimitExceeded:
            raise
        except Exception:
            if self._fallback_limiter is None or not self._storage_dead:
                raise
        self.context.seen_limits.clear()
        try:
            super()._check_request_limit(callable_name, in_middleware)  # now on the fallback
        except RateLimitExceeded:
            raise
        except Exception:  # the in-memory fallback itself failed: fail open, as documented
            log.exception("rate limit check failed; this request is not limited")


def _client_address() -> str:
    """The bucket key: the client's address (after ProxyFix, when proxies are trusted)."""
    return request.remote_addr or "unknown"


def _not_a_prediction() -> bool:
    """Flask-Limiter request filter: True (exempt) for everything but the prediction routes."""
    return request.endpoint not in LIMITED_ENDPOINTS


def _rate_limited(error: RateLimitExceeded) -> ResponseReturnValue:
    """429 in the app's format (errors.py), with Retry-After in whole seconds from the bucket."""
    from .errors import handle_http_exception

    limiter: BucketLimiter = current_app.extensions[LIMITER_KEY]
    breached = limiter.current_limit
    strategy = limiter.limiter
    try:
        wait = strategy.retry_after(breached.limit, *breached.request_args)
    except Exception:  # the store failed between the refusal and this look-up
        log.warning("rate limit store unavailable for Retry-After; answering one token's time")
        wait = strategy.buckets.interval
    # Whole seconds (RFC 9110 delay-seconds), rounded up so a retry at that time succeeds.
    error.retry_after = max(1, math.ceil(wait))
    return handle_http_exception(error)


def trust_proxies(app: Flask) -> None:
    """Wrap the WSGI app in ProxyFix when BRAINMRI_TRUSTED_PROXIES names a number of proxy hops."""
    hops = int(app.config.get("BRAINMRI_TRUSTED_PROXIES") or 0)
    if hops > 0:
        # Only X-Forwarded-For: the limiter and the logs need the client address, nothing else.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops)


def _bucket_factory(app: Flask, rate: float, burst: int) -> Callable[[Storage], Buckets]:
    """Build the bucket store that belongs to a storage Flask-Limiter connected."""
    max_clients = int(app.config.get("BRAINMRI_RATE_LIMIT_MAX_CLIENTS") or 10_000)

    def buckets_for(storage: Storage) -> Buckets:
        if isinstance(storage, RedisStorage):  # also Sentinel and Cluster
            return RedisBuckets(storage.get_connection(), rate, burst, prefix=storage.key_prefix)
        if isinstance(storage, MemoryStorage):
            return RateLimiter(rate, burst, max_clients)
        raise ValueError(_unsupported(type(storage).__name__))

    return buckets_for


def _unsupported(what: str) -> str:
    return (f"RATELIMIT_STORAGE_URI: {what} is not supported; the token bucket runs in memory "
            "(memory://) or Redis (redis://, rediss://, redis+unix://, redis+sentinel://, "
            "redis+cluster://).")


def init_app(app: Flask) -> None:
    """Install the limiter from BRAINMRI_RATE_LIMIT* (or nothing when off) and the proxy setting."""
    trust_proxies(app)
    rate = parse_rate(app.config.get("BRAINMRI_RATE_LIMIT"))
    if rate is None:
        return
    burst = int(app.config.get("BRAINMRI_RATE_LIMIT_BURST") or 1)
    uri = str(app.config.get("RATELIMIT_STORAGE_URI") or "memory://")
    scheme = uri.partition("://")[0].lower()
    if scheme not in STORAGE_SCHEMES:  # before Flask-Limiter tries to import its client
        raise ValueError(_unsupported(f"{scheme}://"))
    app.config["RATELIMIT_STORAGE_URI"] = uri  # explicit, so Flask-Limiter does not warn
    shared = not uri.startswith("memory:")
    timeout = float(app.config.get("RATELIMIT_STORAGE_TIMEOUT") or 0.5)
    limit = ApplicationLimit(limit_string(rate), key_function=_client_address, scope=_SCOPE)
    limiter = BucketLimiter(
        _client_address,
        _bucket_factory(app, rate, burst),
        application_limits=[limit],
        # Any name works: BucketLimiter replaces the strategy; fixed-window fits every storage.
        strategy="fixed-window",
        # RATELIMIT_STORAGE_OPTIONS from the config are merged over these.
        storage_options=(
            {"socket_connect_timeout": timeout, "socket_timeout": timeout} if shared else {}
        ),
        # Fail open to per-worker buckets while the shared store is down (module docstring).
        in_memory_fallback=[limit] if shared else None,
        # Store errors are handled in BucketLimiter._check_request_limit (counted in the
        # fallback), never swallowed by Flask-Limiter, which would let the request through
        # uncounted.
        swallow_errors=False,
        headers_enabled=False,  # Retry-After on 429 is the one header clients are promised
    )
    limiter.request_filter(_not_a_prediction)
    limiter.init_app(app)
    if limiter.buckets is None:  # switched off through Flask-Limiter's own RATELIMIT_ENABLED
        return
    app.extensions[LIMITER_KEY] = limiter
    app.extensions[EXTENSION_KEY] = limiter.buckets
    app.register_error_handler(RateLimitExceeded, _rate_limited)
    # Flask-Limiter logs every refusal at INFO with the client's address; the app never logs
    # who asked (logs.py), and errors.py already logs the refusal with the request id.
    logging.getLogger("flask-limiter").setLevel(logging.WARNING)
