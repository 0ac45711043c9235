"""The settings object the app builder binds to every deployment (no Ray import here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from halldyll_ray.config import Settings
from halldyll_ray.errors import ConfigurationError


class SettingsOverrides(BaseModel):
    """The settings given to the builder (``AppArgs.settings``), checked once, bound to every
    deployment; each replica resolves the rest from its own environment, once, at start.

    Why the builder does not bind a whole :class:`Settings`: with a config file
    (``serve run serve_config.yaml``, ``serve deploy``, KubeRay), Serve calls the builder in a
    task of its own (``build_serve_application`` in Ray's ``serve/_private/application_state.py``:
    ``num_cpus=0``, the application's ``runtime_env``, on any node), and the environment of that
    task need not be the replicas':

    - a deployment's ``ray_actor_options.runtime_env`` adds variables that only its replicas
      see (``kuberay/serve_overrides.yaml`` sets ``EMBEDDING_PROVIDER=cuda`` on Embedding);
    - replicas run on other nodes, whose environment comes from their own pod spec or
      ``ray start`` shell, not from the node the builder ran on;
    - what the builder returns is pickled and kept by the Serve controller (in the GCS, which
      KubeRay's fault tolerance stores in an external Redis): settings resolved there would copy
      DATABASE_URL and REDIS_URL out of the pods' environment into it.

    So this holds only the variables given explicitly, validated by :class:`Settings`' own
    rules (secrets as ``SecretStr``, masked in a repr), and :meth:`resolve` lays them over the
    environment of the process that calls it.
    """

    model_config = ConfigDict(frozen=True)

    values: dict[str, Any] = Field(
        default_factory=dict,
        description="Validated values by Settings field name (the variable name, lower case).",
    )

    @classmethod
    def from_variables(cls, variables: Mapping[str, str]) -> SettingsOverrides:
        """Check ``variables`` (by environment variable name) and keep their typed values.

        Raises:
            ConfigurationError: A name that is not a setting, or a bad value; the variables
                are checked together with this process's environment, so the builder fails
                fast on a configuration no replica could start with.
        """
        given = {name.lower(): value for name, value in variables.items()}
        unknown = sorted(name.upper() for name in given.keys() - Settings.model_fields.keys())
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) in the application's args.settings: {', '.join(unknown)}",
                variables=unknown,
            )
        checked = Settings.from_env(**given)
        return cls(values={name: getattr(checked, name) for name in given})

    def resolve(self) -> Settings:
        """The settings of this process: the overrides over its environment."""
        return Settings.from_env(**self.values)


__all__ = ["SettingsOverrides"]
