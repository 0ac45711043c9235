"""The Serve environment helper: sets what is missing, never overrides an operator's choice."""

from __future__ import annotations

from halldyll_ray.serve_env import SERVE_ENVIRONMENT, apply


def test_apply_sets_missing_variables_and_keeps_given_ones() -> None:
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "UNRELATED": "x"}
    result = apply(env)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the operator opted out
    assert (
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == SERVE_ENVIRONMENT["RAY_SERVE_THROUGHPUT_OPTIMIZED"]
    )
    assert env["UNRELATED"] == "x"
    assert result == {name: env[name] for name in SERVE_ENVIRONMENT}
    assert set(result) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED",
        "RAY_SERVE_ENABLE_HA_PROXY",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE",
    }


def test_without_an_haproxy_binary_haproxy_stays_off() -> None:
    env: dict[str, str] = {}
    assert apply(env, haproxy=False) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    }
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env
    assert apply(env, haproxy=True)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
