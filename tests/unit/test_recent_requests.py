"""RecentRequests: the in-memory request metrics behind GET /v1/stats (pure logic, own clock)."""

from __future__ import annotations

from halldyll_ray.serve.http import RecentRequests


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counts_latency_quantiles_and_errors_per_route_and_minute() -> None:
    clock = Clock(1_800_000_000.0)  # 2027-01-15T08:00:00Z, a minute boundary
    recent = RecentRequests(minutes=3, clock=clock)
    for ms in (0.5, 3, 3, 3, 40, 40, 40, 40, 40, 900):
        recent.record("GET", "/v1/me", 200, ms)
    recent.record("POST", "/v1/users/{user_id}/search", 503, 12_000)
    snap = recent.snapshot()
    assert snap["started_at"] == "2027-01-15T08:00:00Z" and snap["window_minutes"] == 3
    me = next(r for r in snap["routes"] if r["route"] == "/v1/me")
    assert me["requests"] == 10 and me["errors"] == 0
    assert me["mean_ms"] == round((0.5 + 9 + 200 + 900) / 10, 3)
    assert me["p50_ms"] == 50.0  # the 5th of 10 falls in the (20, 50] bucket
    # The 10th falls in the (500, 1000] bucket, whose bound is above the largest seen: a
    # quantile is never reported above the max.
    assert me["p95_ms"] == 900.0 and me["max_ms"] == 900.0
    search = next(r for r in snap["routes"] if r["method"] == "POST")
    assert search["errors"] == 1 and search["p95_ms"] == 12_000.0 == search["max_ms"]
    for route in snap["routes"]:
        assert route["p50_ms"] <= route["p95_ms"] <= route["max_ms"], route
    assert [m["requests"] for m in snap["minutes"]] == [11]
    assert snap["minutes"][0]["at"] == "2027-01-15T08:00:00Z"


def test_past_the_open_bucket_the_largest_latency_is_the_bound() -> None:
    recent = RecentRequests(clock=Clock(0.0))
    recent.record("GET", "/slow", 200, 45_000)
    assert recent.snapshot()["routes"][0]["p95_ms"] == 45_000.0


def test_only_the_last_minutes_are_kept() -> None:
    clock = Clock(600.0)
    recent = RecentRequests(minutes=2, clock=clock)
    for minute in range(4):
        clock.now = 600.0 + 60 * minute
        recent.record("GET", "/v1/me", 200, 1)
        recent.record("GET", "/v1/me", 404, 1)
    minutes = recent.snapshot()["minutes"]
    assert [m["at"] for m in minutes] == ["1970-01-01T00:12:00Z", "1970-01-01T00:13:00Z"]
    assert [m["requests"] for m in minutes] == [2, 2] and minutes[0]["errors"] == 0
    # Minutes the clock has moved past are dropped from the answer, even with no new request.
    clock.now += 60 * 5
    assert recent.snapshot()["minutes"] == []
    assert recent.snapshot()["routes"][0]["requests"] == 8  # per route: since the start


def test_each_window_names_its_slowest_request_with_its_ids() -> None:
    recent = RecentRequests(clock=Clock(0.0))
    recent.record("GET", "/v1/me", 200, 3, request_id="r-1", trace_id="a" * 32)
    recent.record("GET", "/v1/me", 503, 70, request_id="r-2", trace_id="b" * 32)
    recent.record("GET", "/v1/me", 200, 9, request_id="r-3")
    snap = recent.snapshot()
    slowest = {"ms": 70.0, "status": 503, "request_id": "r-2", "trace_id": "b" * 32}
    assert snap["routes"][0]["slowest"] == slowest
    assert snap["minutes"][0]["slowest"] == slowest
    recent.record("GET", "/v1/me", 200, 71, request_id="r-4")  # tracing off: no trace id
    assert recent.snapshot()["routes"][0]["slowest"]["trace_id"] is None
