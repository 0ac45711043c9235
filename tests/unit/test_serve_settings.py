"""The settings object the app builder binds: the given variables, resolved in each replica."""

from __future__ import annotations

import pickle

import pytest
from pydantic import SecretStr

from halldyll_ray.errors import ConfigurationError
from halldyll_ray.serve.settings import SettingsOverrides

URL = "postgresql://app:s3cret@db.example:5432/halldyll"


def test_overrides_keep_typed_values_and_mask_secrets() -> None:
    overrides = SettingsOverrides.from_variables({"DATABASE_URL": URL, "DB_POOL_SIZE": "3"})
    assert overrides.values["db_pool_size"] == 3
    assert isinstance(overrides.values["database_url"], SecretStr)
    assert "s3cret" not in repr(overrides)
    again = pickle.loads(pickle.dumps(overrides))  # bound: it travels to every replica
    assert again.resolve().database_url.get_secret_value() == URL  # type: ignore[union-attr]


def test_the_replica_environment_supplies_what_was_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides = SettingsOverrides.from_variables({"REDIS_KEY_PREFIX": "given"})
    # A variable only the replica's runtime_env sets (kuberay: EMBEDDING_PROVIDER on Embedding).
    monkeypatch.setenv("EMBEDDING_PROVIDER", "cpu")
    monkeypatch.setenv("REDIS_KEY_PREFIX", "from-env")
    settings = overrides.resolve()
    assert settings.embedding_provider == "cpu"
    assert settings.redis_key_prefix == "given"  # the builder's args win, as before
    assert "embedding_provider" not in overrides.values


def test_bad_or_unknown_variables_fail_in_the_builder() -> None:
    with pytest.raises(ConfigurationError, match="DB_POOL_SIZE"):
        SettingsOverrides.from_variables({"DB_POOL_SIZE": "0"})
    with pytest.raises(ConfigurationError, match="DATABSE_URL"):
        SettingsOverrides.from_variables({"DATABSE_URL": URL})
