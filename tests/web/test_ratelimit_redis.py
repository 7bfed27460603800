"""Rate limits on Flask-Limiter: shared through a real redis-server, and Redis going away.

The behaviour is the in-memory one (tests/test_ratelimit.py); what changes is where the buckets
live (RATELIMIT_STORAGE_URI). Each test starts its own redis-server on a free loopback port, without persistence
(conftest.RedisServer); without the binary they skip, and under CI=true they fail.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections import Counter

import pytest

from brainmri.web.ratelimit import EXTENSION_KEY as BUCKETS_KEY
from brainmri.web.ratelimit import RateLimiter
from brainmri.web.ratelimit import RedisBuckets
from brainmri.web.ratelimit import limit_string
from brainmri.web.ratelimit import parse_rate
from conftest import encode
from conftest import synthetic_slice
from test_ratelimit import limited_app
from test_ratelimit import post_api


def test_redis_buckets_behave_like_the_memory_ones(png_bytes, redis_server):
    """Burst, Retry-After, refill and the burst cap, exactly as in memory, but kept in Redis."""
    app, clock = limited_app(RATELIMIT_STORAGE_URI=redis_server.url)
    assert isinstance(app.extensions[BUCKETS_KEY], RedisBuckets)
    client = app.test_client()
    for _ in range(3):
        assert post_api(client, png_bytes).status_code == 200
    response = post_api(client, png_bytes)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "10"
    assert response.get_json()["error"]["code"] == "rate_limited"
    clock.now += 4
    assert post_api(client, png_bytes).headers["Retry-After"] == "6"
    clock.now += 6
    assert post_api(client, png_bytes).status_code == 200
    assert post_api(client, png_bytes).status_code == 429
    clock.now += 3600
    assert [post_api(client, png_bytes).status_code for _ in range(4)] == [200, 200, 200, 429]
    # The bucket is in Redis, keyed by address and the shared "predict" scope.
    keys = [key.decode() for key in redis_server.client().keys("*")]
    assert keys and all("198.51.100.7" in key and "/predict/" in key for key in keys)


def test_redis_page_route_and_probes(png_bytes, redis_server):
    """HTML 429 for the page; probes and pages stay unlimited with Redis storage too."""
    app, _ = limited_app(RATELIMIT_STORAGE_URI=redis_server.url, BRAINMRI_RATE_LIMIT_BURST=1)
    client = app.test_client()
    form = lambda: {"file": (io.BytesIO(png_bytes), "scan.png")}  # noqa: E731
    assert client.post("/predict", data=form()).status_code == 200
    response = client.post("/predict", data=form())
    assert response.status_code == 429 and response.mimetype == "text/html"
    assert int(response.headers["Retry-After"]) >= 1
    for _ in range(10):
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200


def test_two_workers_share_one_bucket_in_redis(png_bytes, redis_server):
    """Two app instances (as two workers would be) on one Redis: the client gets the limit once."""
    settings = {"BRAINMRI_RATE_LIMIT": "1/hour", "BRAINMRI_RATE_LIMIT_BURST": 3}
    first, _ = limited_app(RATELIMIT_STORAGE_URI=redis_server.url, **settings)
    second, _ = limited_app(RATELIMIT_STORAGE_URI=redis_server.url, **settings)
    a, b = first.test_client(), second.test_client()
    statuses = [post_api(client, png_bytes).status_code for client in (a, b, a, b, a, b)]
    assert statuses == [200, 200, 200, 429, 429, 429]


def test_memory_storage_is_per_worker(png_bytes):
    """The contrast: with memory:// each worker keeps its own buckets (W times the limit)."""
    settings = {"BRAINMRI_RATE_LIMIT": "1/hour", "BRAINMRI_RATE_LIMIT_BURST": 3}
    first, _ = limited_app(**settings)
    second, _ = limited_app(**settings)
    assert isinstance(first.extensions[BUCKETS_KEY], RateLimiter)
    a, b = first.test_client(), second.test_client()
    statuses = [post_api(client, png_bytes).status_code for client in (a, b, a, b, a, b, a, b)]
    assert statuses == [200] * 6 + [429, 429]


def test_concurrent_requests_never_overspend_in_redis(redis_server):
    """The Lua script is atomic: 8 threads, frozen clock, exactly `burst` tokens are given."""
    buckets = RedisBuckets(redis_server.client(), rate=1.0, burst=50, clock=lambda: 1000.0)
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        mine = [buckets.acquire("10.0.0.1") == 0 for _ in range(20)]
        with lock:
            allowed.extend(mine)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 50


def _wait_for(condition, timeout: float, step: float = 0.25) -> bool:
    """Poll `condition()` until it is true or `timeout` seconds pass (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


def test_redis_going_away_fails_open_to_per_worker_limits(png_bytes, redis_server, caplog):
    """Redis stops mid-test: no 5xx; each worker limits in memory; Redis is used again later."""
    caplog.set_level(logging.WARNING, logger="brainmri.ratelimit")
    app, _ = limited_app(RATELIMIT_STORAGE_URI=redis_server.url, BRAINMRI_RATE_LIMIT="1/hour",
                         BRAINMRI_RATE_LIMIT_BURST=2)
    client = app.test_client()
    assert [post_api(client, png_bytes).status_code for _ in range(3)] == [200, 200, 429]

    redis_server.stop()
    # The shared bucket is out of reach; this worker's own in-memory bucket takes over, full,
    # so the client is served again, and limited again once that bucket is empty.
    assert [post_api(client, png_bytes).status_code for _ in range(3)] == [200, 200, 429]
    assert any("Redis) unreachable" in r.getMessage() for r in caplog.records)
    assert client.get("/healthz").status_code == 200
    assert post_api(client, png_bytes, "192.0.2.9").status_code == 200  # others unaffected

    # Back on Redis (it restarts empty): Flask-Limiter re-checks it with backoff (1, 2, 4 s...).
    redis_server.start()
    redis = redis_server.client()

    def recovered() -> bool:
        post_api(client, png_bytes, "192.0.2.77")
        return bool(redis.keys("*192.0.2.77*"))

    assert _wait_for(recovered, timeout=90), "the limiter never went back to Redis"
    assert any("answers again" in r.getMessage() for r in caplog.records)


def test_a_request_caught_in_the_switch_to_memory_is_counted(png_bytes, redis_server,
                                                              monkeypatch):
    """A store call that fails after another thread switched to the fallback still counts.

    Simulates the race of two gthread threads when Redis stops: this request's Redis call
    fails after the worker has already been marked as on its in-memory fallback. It must be
    counted there (burst 1: the next request is refused), not let through uncounted.
    """
    from brainmri.web.ratelimit import LIMITER_KEY

    app, _ = limited_app(RATELIMIT_STORAGE_URI=redis_server.url, BRAINMRI_RATE_LIMIT="1/hour",
                         BRAINMRI_RATE_LIMIT_BURST=1)
    limiter = app.extensions[LIMITER_KEY]
    client = app.test_client()

    def fails_after_the_switch(*args, **kwargs):
        limiter._storage_dead = True  # what the other thread's failure did meanwhile
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(app.extensions[BUCKETS_KEY], "acquire", fails_after_the_switch)
    assert [post_api(client, png_bytes).status_code for _ in range(2)] == [200, 429]


def test_unreachable_redis_at_start_still_serves(png_bytes):
    """A Redis URI nobody listens on: the app starts, serves and limits per worker."""
    from benchmarks.harness import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    app, _ = limited_app(RATELIMIT_STORAGE_URI=url, BRAINMRI_RATE_LIMIT_BURST=2)
    client = app.test_client()
    assert [post_api(client, png_bytes).status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize(("rate", "text"), [("2/second", "2/second"), ("6/minute", "6/minute"),
                                            ("1.5/second", "90/minute"), ("1/hour", "1/hour"),
                                            (90, "90/minute")])
def test_the_limit_is_named_in_flask_limiters_notation(rate, text):
    """The rate as Flask-Limiter parses it (its name and key); the bucket keeps the exact rate."""
    assert limit_string(parse_rate(rate)) == text
    app, _ = limited_app(BRAINMRI_RATE_LIMIT=rate)
    assert app.extensions[BUCKETS_KEY].rate == parse_rate(rate)


def test_flask_limiters_own_switch_turns_it_off(png_bytes):
    """RATELIMIT_ENABLED=false (Flask-Limiter's setting) also means no limit."""
    app, _ = limited_app(RATELIMIT_ENABLED=False, BRAINMRI_RATE_LIMIT_BURST=1)
    assert BUCKETS_KEY not in app.extensions
    client = app.test_client()
    assert all(post_api(client, png_bytes).status_code == 200 for _ in range(3))


def test_unsupported_storage_is_refused_at_start():
    """A storage the token bucket cannot run on fails at start-up, naming the supported ones."""
    with pytest.raises(ValueError, match=r"memcached:// is not supported.*memory://.*Redis"):
        limited_app(RATELIMIT_STORAGE_URI="memcached://127.0.0.1:11211")


# --- two real gunicorn workers sharing one Redis -------------------------------------------

_ACCESS = re.compile(r"^<?(\d+)>? (\S+) (\d{3})$")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small (32, 32, 1) CNN .h5 with metadata: the workers need a model, not a good one."""
    keras = pytest.importorskip("keras")
    from keras import layers

    from brainmri.inference import CLASSES
    from brainmri.inference import write_model_card

    model = keras.Sequential([
        keras.Input(shape=(32, 32, 1)),
        layers.Conv2D(4, 3, activation="relu", name="last_conv"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(len(CLASSES), activation="softmax"),
    ])
    path = tmp_path_factory.mktemp("model") / "ratelimit-tiny.h5"
    model.save(path)
    write_model_card(path, {"name": "ratelimit-tiny", "version": "0.0.1",
                            "classes": list(CLASSES), "input": {"size": 32, "channels": 1}})
    return path


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_two_gunicorn_workers_share_the_limit(tiny_model, redis_server, tmp_path):
    """2 gunicorn workers on loopback, one Redis: a client gets `burst` answers, not twice that.

    Then Redis is stopped under the running server: no request fails, and each worker limits
    the client on its own (at most `burst` per worker).
    """
    from benchmarks.harness import GunicornServer
    from benchmarks.harness import multipart
    from benchmarks.harness import post_predict

    burst, workers = 4, 2
    access_log = tmp_path / "access.log"
    env = {
        "FLASK_BRAINMRI_MODEL_PATH": json.dumps(str(tiny_model)),  # not whichever is default
        "FLASK_BRAINMRI_RATE_LIMIT": "1/hour",  # no refill during the test
        "FLASK_BRAINMRI_RATE_LIMIT_BURST": str(burst),
        "FLASK_RATELIMIT_STORAGE_URI": redis_server.url,
        # Each round poses as a new client behind one proxy, through X-Forwarded-For.
        "FLASK_BRAINMRI_TRUSTED_PROXIES": "1",
    }
    # Which worker answered each request: gunicorn's access log with the pid.
    args = ["--access-logfile", str(access_log),
            "--access-logformat", "%(p)s %({x-forwarded-for}i)s %(s)s"]
    body, content_type = multipart(encode(synthetic_slice()), "scan.png", "image/png")

    def flood(client_addr: str, requests: int = 16, parallel: int = 4) -> list[int | None]:
        """`requests` predictions from one client, `parallel` at a time."""
        statuses: list[int | None] = []
        lock = threading.Lock()
        remaining = iter(range(requests))

        def run() -> None:
            for _ in remaining:
                outcome = post_predict(server.port, body, content_type, timeout=60,
                                       headers={"X-Forwarded-For": client_addr})
                with lock:
                    statuses.append(outcome.status)

        threads = [threading.Thread(target=run) for _ in range(parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        return statuses

    def pids_for(client_addr: str) -> set[str]:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        return {m.group(1) for m in map(_ACCESS.match, lines) if m and m.group(2) == client_addr}

    with GunicornServer(env, workers, args) as server:
        server.wait_ready(workers, timeout=300)
        spanned = 0
        # The kernel decides which worker accepts each connection; a round that happened to
        # stay on one worker proves nothing about sharing, so try a few clients.
        for round_ in range(6):
            addr = f"203.0.113.{round_ + 1}"
            statuses = flood(addr)
            assert Counter(statuses) == {200: burst, 429: 16 - burst}, (addr, statuses, server.log[-2000:])
            spanned += _wait_for(lambda: len(pids_for(addr)) >= workers, timeout=5, step=0.1)
            if spanned:
                break
        assert spanned, "no round reached both workers; the test could not check sharing"

        # Redis goes away under the running server. The client that was just refused is
        # served again by each worker's own in-memory bucket, and limited again when it is
        # empty: never a failed request, at most `burst` answers per worker.
        redis_server.stop()
        statuses = flood(addr, requests=4 * burst)
        assert set(statuses) <= {200, 429}, (statuses, server.log[-2000:])
        assert burst <= statuses.count(200) <= workers * burst, statuses
        assert "(Redis) unreachable" in server.log  # each worker says so in its log
