"""The Serve environment helper: sets what is missing, never overrides an operator's choice."""

from __future__ import annotations

import os
import subprocess
import sys

from halldyll_ray.serve_env import SERVE_ENVIRONMENT, apply, exports


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
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH",
    }


def test_without_an_haproxy_binary_haproxy_stays_off() -> None:
    env: dict[str, str] = {}
    assert apply(env, haproxy=False) == {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "268435456",
    }
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env
    assert apply(env, haproxy=True)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"


def test_exports_for_a_shell_that_starts_ray() -> None:
    assert exports({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, haproxy=True) == (
        "export RAY_SERVE_THROUGHPUT_OPTIMIZED=1\n"
        "export RAY_SERVE_ENABLE_HA_PROXY=0\n"
        "export RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1\n"
        "export RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH=268435456\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    shell = subprocess.run(
        ["bash", "-c", f'eval "$({sys.executable} -m halldyll_ray.serve_env)"; env'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = dict(line.split("=", 1) for line in shell.stdout.splitlines() if "=" in line)
    for name, value in SERVE_ENVIRONMENT.items():
        assert seen.get(name) == value, name
