"""Per-client rate limiting of the prediction endpoints (brainmri/ratelimit.py)."""

from __future__ import annotations

import io
import threading

import pytest

from brainmri import create_app
from brainmri.web import EXTENSION_KEY
from brainmri.web.ratelimit import EXTENSION_KEY as LIMITER_KEY
from brainmri.web.ratelimit import RateLimiter
from brainmri.web.ratelimit import parse_rate
from conftest import FakePredictor


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited_app(**config):
    """The app with limiting on (6/minute, burst 3 unless given), a fake predictor and clock."""
    settings = {
        "TESTING": True,
        "SECRET_KEY": "test-secret",
        "BRAINMRI_SKIP_MODEL": True,
        "BRAINMRI_CSRF_ENABLED": False,
        "BRAINMRI_RATE_LIMIT": "6/minute",
        "BRAINMRI_RATE_LIMIT_BURST": 3,
        **config,
    }
    app = create_app(settings)
    app.extensions[EXTENSION_KEY] = FakePredictor()
    clock = FakeClock()
    if LIMITER_KEY in app.extensions:
        app.extensions[LIMITER_KEY].clock = clock
    return app, clock


def post_api(client, data: bytes, addr: str = "198.51.100.7"):
    """POST one file to the JSON API from `addr`."""
    return client.post(
        "/api/v1/predict",
        data={"file": (io.BytesIO(data), "scan.png")},
        environ_base={"REMOTE_ADDR": addr},
    )


def test_api_limit_gives_429_with_retry_after_and_json(png_bytes):
    app, _ = limited_app()
    client = app.test_client()
    for _ in range(3):
        assert post_api(client, png_bytes).status_code == 200
    response = post_api(client, png_bytes)
    assert response.status_code == 429
    # One token every 10 s at 6/minute, and the bucket is empty.
    assert response.headers["Retry-After"] == "10"
    error = response.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert "10 s" in error["message"]


def test_batch_endpoint_is_limited(png_bytes):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=1)
    client = app.test_client()

    def form():
        return {"files": [(io.BytesIO(png_bytes), "a.png"), (io.BytesIO(png_bytes), "b.png")]}

    assert client.post("/api/v1/predict/batch", data=form()).status_code == 200
    response = client.post("/api/v1/predict/batch", data=form())
    assert response.status_code == 429
    assert response.get_json()["error"]["code"] == "rate_limited"


def test_page_route_gets_html_429(png_bytes):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=1)
    client = app.test_client()
    form = lambda: {"file": (io.BytesIO(png_bytes), "scan.png")}  # noqa: E731
    assert client.post("/predict", data=form()).status_code == 200
    response = client.post("/predict", data=form())
    assert response.status_code == 429
    assert response.mimetype == "text/html"
    assert int(response.headers["Retry-After"]) >= 1
    html = response.get_data(as_text=True)
    assert 'data-code="rate_limited"' in html
    assert "Too many requests" in html


def test_other_endpoints_are_never_limited(png_bytes):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=1)
    client = app.test_client()
    post_api(client, png_bytes)
    assert post_api(client, png_bytes).status_code == 429
    for _ in range(20):
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/readyz").status_code in (200, 503)


def test_addresses_have_separate_buckets(png_bytes):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=2)
    client = app.test_client()
    for _ in range(2):
        assert post_api(client, png_bytes, "192.0.2.1").status_code == 200
    assert post_api(client, png_bytes, "192.0.2.1").status_code == 429
    assert post_api(client, png_bytes, "192.0.2.2").status_code == 200
    assert post_api(client, png_bytes, "2001:db8::2").status_code == 200


def test_tokens_refill_with_time(png_bytes):
    app, clock = limited_app()
    client = app.test_client()
    for _ in range(3):
        post_api(client, png_bytes)
    assert post_api(client, png_bytes).status_code == 429
    clock.now += 4
    response = post_api(client, png_bytes)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "6"  # 4 of the 10 s already passed
    clock.now += 6
    assert post_api(client, png_bytes).status_code == 200
    assert post_api(client, png_bytes).status_code == 429
    clock.now += 3600  # a long pause refills to the burst, not beyond
    assert [post_api(client, png_bytes).status_code for _ in range(4)] == [200, 200, 200, 429]


@pytest.mark.parametrize("setting", [None, 0, ""])
def test_off_when_configured_off(png_bytes, setting):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT=setting, BRAINMRI_RATE_LIMIT_BURST=1)
    assert LIMITER_KEY not in app.extensions
    client = app.test_client()
    assert all(post_api(client, png_bytes).status_code == 200 for _ in range(5))


def test_on_by_default():
    app = create_app({"TESTING": True, "SECRET_KEY": "x", "BRAINMRI_SKIP_MODEL": True})
    assert isinstance(app.extensions[LIMITER_KEY], RateLimiter)
    from brainmri.config import DEFAULTS

    assert parse_rate(DEFAULTS["BRAINMRI_RATE_LIMIT"]) == 1.0


@pytest.mark.parametrize(
    ("value", "per_second"),
    [("30/minute", 0.5), ("2/second", 2.0), ("3600 per hour", 1.0), (120, 2.0), ("0/minute", None)],
)
def test_parse_rate(value, per_second):
    assert parse_rate(value) == per_second


@pytest.mark.parametrize("value", ["lots", "5/fortnight", -1])
def test_parse_rate_refuses_typos(value):
    with pytest.raises(ValueError):
        parse_rate(value)


def test_table_stays_bounded():
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=5, max_clients=100, clock=clock)
    for n in range(1000):
        limiter.acquire(f"10.0.{n // 256}.{n % 256}")
    assert len(limiter) == 100
    # Buckets that have refilled completely are forgotten at the next request.
    clock.now += limiter.refill_seconds + 1
    limiter.acquire("10.9.9.9")
    assert len(limiter) == 1


def test_eviction_is_lenient_never_locks_out():
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=2, clock=clock)
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") > 0
    limiter.acquire("b")
    limiter.acquire("c")  # evicts "a", the least recently seen
    assert limiter.acquire("a") == 0


def test_trusted_proxies_take_the_client_from_x_forwarded_for(png_bytes):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=1, BRAINMRI_TRUSTED_PROXIES=1)
    client = app.test_client()

    def post(client_addr: str):
        return client.post(
            "/api/v1/predict",
            data={"file": (io.BytesIO(png_bytes), "scan.png")},
            environ_base={"REMOTE_ADDR": "127.0.0.1"},
            headers={"X-Forwarded-For": client_addr},
        )

    assert post("203.0.113.1").status_code == 200
    assert post("203.0.113.1").status_code == 429
    assert post("203.0.113.2").status_code == 200


def test_without_trusted_proxies_x_forwarded_for_is_ignored(png_bytes):
    app, _ = limited_app(BRAINMRI_RATE_LIMIT_BURST=1)
    client = app.test_client()
    headers = {"X-Forwarded-For": "203.0.113.1"}
    data = lambda: {"file": (io.BytesIO(png_bytes), "scan.png")}  # noqa: E731
    assert client.post("/api/v1/predict", data=data(), headers=headers).status_code == 200
    headers["X-Forwarded-For"] = "203.0.113.2"  # a spoofed header does not buy a new bucket
    assert client.post("/api/v1/predict", data=data(), headers=headers).status_code == 429


def test_concurrent_requests_never_overspend():
    """gthread workers share one limiter: with the clock frozen, exactly `burst` requests pass."""
    limiter = RateLimiter(rate=1.0, burst=100, clock=FakeClock())
    allowed = []

    def hammer():
        allowed.extend(limiter.acquire("10.0.0.1") == 0 for _ in range(50))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(allowed) == 100


def test_a_new_client_is_always_served_whatever_the_clock_reads():
    """Float rounding never refuses a full bucket: (now + 3600) - 3600 may exceed now by an ulp.

    Before the fix a new client's first request (1/hour, burst 1) was refused at about one
    clock reading in three.
    """
    readings = [612.3 + 0.0137 * i for i in range(2000)] + [1.7e9 + 0.37 * i for i in range(500)]
    for now in readings:
        limiter = RateLimiter(1 / 3600, 1, clock=lambda: now)
        assert limiter.acquire("198.51.100.7") == 0.0, now
        assert limiter.acquire("198.51.100.7") > 3599.0, now
