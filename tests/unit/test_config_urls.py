"""DATABASE_URL and REDIS_URL are checked when settings load (halldyll_ray/urls.py): a URL
the driver would refuse, or misread, when it connects is refused at start with one line
naming the variable, the same for the CLI, serve_local and the Serve app, and never the
URL's password."""

from __future__ import annotations

from pathlib import Path

import pytest

from halldyll_ray import ConfigurationError, Settings
from halldyll_ray.cli import main

BAD_DATABASE_URLS = [
    "postgresql://app:hunter2@db:99999/x",  # port out of range
    "postgresql://app:hunter2@db:0/x",
    "postgresql://app:hunter2@db:abc/x",  # port no number
    "postgresql://app:hunter2@db:-1/x",
    "postgresql://app:hunter2@db/x?sslmode=bogus",
    "postgresql://app:hunter2@db/x?target_session_attrs=wat",
    "postgresql://app:hunter2@db/x?ssl_min_protocol_version=SSLv3",
    "postgresql://app:hunter2@db/x?port=x",
    "postgresql://app:hunter2@db/x?novalue",
    "postgresql://app:hunter2@[::1/x",  # an IPv6 address without its ']'
    "postgresql://app:hunter2@[::1]x/x",
    "postgresql://app:hunter2@h1:5432,h2:99999/x",  # the second host's port
    "postgresql://app:hunter2@h1,,h2/x",
    "postgresql://app:hunter2 @db/x",
    "postgresql://app:hunter2/x",  # no '@': the password reads as the port, never echoed
    "mysql://app:hunter2@db/x",
    "hunter2",
]
BAD_REDIS_URLS = [
    "redis://:hunter2@cache:abc",
    "redis://:hunter2@cache:99999/0",
    "redis://:hunter2@cache:0/0",
    "redis://:hunter2@cache:6379/abc",  # redis-py silently used db 0
    "redis://:hunter2@cache:6379/0?db=x",
    "redis://:hunter2@cache:6379/0?socket_timeout=x",
    "rediss://:hunter2@cache:6379/0?ssl_cert_reqs=bogus",
    "redis://:hunter2@cache:6379/0?protocol=9",
    "redis://:hunter2@[::1",
    "unix://",
    "http://:hunter2@cache",
]


@pytest.mark.parametrize(
    ("name", "value"),
    [("database_url", url) for url in BAD_DATABASE_URLS]
    + [("redis_url", url) for url in BAD_REDIS_URLS],
)
def test_a_malformed_url_is_refused_when_settings_load(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env(**{name: value})
    message = err.value.message
    assert message.count("\n") == 1 and f"\n  {name.upper()}: " in message, message
    assert "hunter2" not in message and "Value error" not in message
    assert err.value.fields == {"variables": 1}


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:p%40ss@db.example:5432/halldyll",
        "postgres://db/x?sslmode=verify-full&target_session_attrs=read-write",
        "postgresql://app@h1:5432,h2:5433,[::1]:5434/x?target_session_attrs=primary",
        "postgresql://app@h1,h2/x?port=5432,5433",
        "postgresql://app@%2Fvar%2Frun%2Fpostgresql/x",
        "postgresql:///x?host=/var/run/postgresql",
        "postgresql://",
    ],
)
def test_good_database_urls_still_load(url: str) -> None:
    settings = Settings.from_env(database_url=url)
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://:secret@[::1]:6379/15?socket_timeout=2&protocol=3",
        "rediss://user:secret@cache.example/2?ssl_cert_reqs=required",
        "unix:///run/redis/redis.sock?db=3",
        "redis://cache",
    ],
)
def test_good_redis_urls_still_load(url: str) -> None:
    settings = Settings.from_env(redis_url=url)
    assert settings.redis_url is not None


@pytest.mark.parametrize("command", ["doctor", "migrate"])
def test_the_cli_says_one_line_per_bad_url_and_exits_2(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@h:99999/db?sslmode=bogus")
    monkeypatch.setenv("REDIS_URL", "redis://:hunter2@h:abc")
    assert main([command]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0] == "error: invalid configuration:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["DATABASE_URL", "REDIS_URL"]
    assert "Traceback" not in err and "hunter2" not in err + out


def test_other_settings_with_bad_values(tmp_path: Path) -> None:
    # An empty DATA_DIR is unset, as every other setting: not the current folder.
    assert Settings.from_env(data_dir="").data_dir == Settings.from_env().data_dir
    with pytest.raises(ConfigurationError, match="DATA_DIR: must be a folder path"):
        Settings.from_env(data_dir="   ")
    # A path too long for the file system: an OSError from exists() was a traceback.
    with pytest.raises(ConfigurationError, match=r"EMBEDDING_MODEL_PATH: 'x{40}'… does not"):
        Settings.from_env(embedding_model_path="x" * 10_000)
    # Past PostgreSQL's bigint, the SQL of `halldyll index-users` failed.
    with pytest.raises(ConfigurationError, match="LARGE_USER_INDEX_ROWS"):
        Settings.from_env(large_user_index_rows=10**20)


def test_the_serve_apps_settings_are_checked_the_same_way() -> None:
    from halldyll_ray.serve.settings import SettingsOverrides

    with pytest.raises(ConfigurationError) as err:
        SettingsOverrides.from_variables({"REDIS_URL": "redis://:hunter2@cache:abc"})
    assert "REDIS_URL: host: the port is not a number" in err.value.message
    assert "hunter2" not in err.value.message


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        ({"llm_base_url": "http://h:99999/v1"}, "LLM_BASE_URL: must be an http"),
        ({"llm_base_url": "http://[::1/v1"}, "LLM_BASE_URL: must be an http"),
        ({"llm_base_url": "http://:80/v1"}, "LLM_BASE_URL: must be an http"),
        ({"llm_api_key": "sk-hunter2\nX-Evil: 1"}, "LLM_API_KEY: must be the key alone"),
        ({"llm_api_key": "sk-hunter2é"}, "LLM_API_KEY: must be the key alone"),
    ],
)
def test_the_llm_endpoint_is_checked_as_its_client_reads_it(
    overrides: dict[str, str], line: str
) -> None:
    # Each failed every LLM call (httpx's InvalidURL, a header it refuses), not the start.
    base = {"llm_provider": "openai", "llm_model": "m", "llm_base_url": "http://h/v1"}
    with pytest.raises(ConfigurationError) as err:
        Settings.from_env(**{**base, **overrides})
    assert f"\n  {line}" in err.value.message and "hunter2" not in err.value.message
    assert Settings.from_env(**base, llm_api_key="").llm_api_key is None
