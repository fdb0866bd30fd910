"""The replay's REMOTE store: the token bucket alone (a fake clock), then the real HTTP server on loopback."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import pytest
from diffmesh.replay.remote_store import RangeNotSatisfiable, RemoteStore, StoreCounters, parse_range
from diffmesh.replay.token_bucket import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_allows_a_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.reserve(500) == 0.0  # the burst
    assert bucket.reserve(250) == pytest.approx(0.25)  # in debt: 250 B at 1000 B/s
    assert bucket.reserve(250) == pytest.approx(0.5)  # behind the first taker
    clock.now = 0.5
    assert bucket.reserve(0) == pytest.approx(0.0)  # debt paid
    bucket.take(1000)
    assert clock.slept == [pytest.approx(1.0)]


def test_bucket_refills_only_up_to_the_burst_and_none_is_unlimited() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100.0, burst=50, clock=clock, sleep=clock.sleep)
    clock.now = 100.0  # idle for long: still only `burst` tokens
    assert bucket.reserve(150) == pytest.approx(1.0)
    bucket.set_rate(None)
    assert bucket.reserve(10**9) == 0.0
    with pytest.raises(ValueError):
        bucket.set_rate(0.0)
    with pytest.raises(ValueError):
        TokenBucket(10.0, burst=0)


def test_parse_range_forms() -> None:
    assert parse_range("", 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=95-200", 100) == (95, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # multi-range: whole file
    for bad in ("bytes=100-", "bytes=5-2", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(bad, 100)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "base" / "b0" / "unet").mkdir(parents=True)
    (tmp_path / "base" / "b0" / "unet" / "w.safetensors").write_bytes(bytes(range(256)) * 400)  # 102,400 B
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "l0.safetensors").write_bytes(b"x" * 1000)
    return tmp_path


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, dict(resp.headers), resp.read()


def test_store_serves_ranges_heads_and_index_pages_and_counts_body_bytes(folder: Path) -> None:
    with RemoteStore(folder) as store:
        url = store.url
        status, headers, body = _get(f"{url}/base/b0/unet/w.safetensors", {"Range": "bytes=10-19"})
        assert status == 206 and body == bytes(range(10, 20)) and headers["Content-Range"] == "bytes 10-19/102400"
        status, headers, body = _get(f"{url}/lora/l0.safetensors", method="HEAD")
        assert status == 200 and headers["Content-Length"] == "1000" and body == b""
        status, _, body = _get(f"{url}/lora/l0.safetensors")
        assert status == 200 and body == b"x" * 1000
        _, _, index = _get(f"{url}/base/b0/")
        assert b'href="unet/"' in index  # the HTTP fetcher walks folders through these pages
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"{url}/lora/l0.safetensors", {"Range": "bytes=5000-"})
        assert err.value.code == 416
        assert store.counters() == StoreCounters(body_bytes=1010, gets=2, heads=1)
        assert store.counters().minus(StoreCounters(10, 1, 1)) == StoreCounters(1000, 1, 0)


def test_store_caps_the_rate_of_all_fetches_together(folder: Path) -> None:
    # Two concurrent 100 KiB reads at 200 kB/s (64 KiB burst): together at least ~0.7 s.
    with RemoteStore(folder, rate=200_000.0, burst=64 * 1024) as store:
        url = f"{store.url}/base/b0/unet/w.safetensors"
        started = time.monotonic()
        threads = [threading.Thread(target=_get, args=(url,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        elapsed = time.monotonic() - started
        assert store.counters().body_bytes == 2 * 102_400
        assert elapsed >= (2 * 102_400 - store.bucket.burst) / 200_000.0 * 0.95
