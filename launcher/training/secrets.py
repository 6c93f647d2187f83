"""Secrets (API keys, tokens, passwords) from the driver's environment to the workers, by a path
nothing writes down.

Settings reach the workers as Ray ``runtime_env`` variables, and Ray logs every
runtime env it creates (the session's ``logs/runtime_env_agent.log``,
world-readable). So secrets are split off (``split``) and held in memory by a
small actor on the driver's node (``SecretStore``); each worker asks it for them
when it starts (``install``) and puts them into its own environment, where
Hugging Face and W&B look for them. Nothing holds them in a file, a log, a
checkpoint or a manifest.
"""

from __future__ import annotations

import os

NAMES = frozenset({"WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})
SUFFIXES = ("_TOKEN", "_KEY", "_SECRET", "_PASSWORD")


def is_secret(name: str) -> bool:
    """Whether an environment variable holds a secret: a known name, or one ending in a secret suffix."""
    return name in NAMES or name.upper().endswith(SUFFIXES)


def split(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain settings, secrets) of ``env``."""
    secrets = {k: v for k, v in env.items() if is_secret(k)}
    return {k: v for k, v in env.items() if k not in secrets}, secrets


class SecretStore:
    """Holds the driver's secrets in memory for the workers of one launch (a Ray actor)."""

    def __init__(self):
        self._values: dict[str, str] = {}

    def put(self, values: dict[str, str]) -> None:
        self._values = dict(values)

    def get(self) -> dict[str, str]:
        return dict(self._values)


def store(values: dict[str, str], **actor_options):
    """A SecretStore actor holding ``values`` (None when there are none). The values travel as a method
    argument, not as a runtime env or actor option, which Ray would log."""
    import ray

    if not values:
        return None
    handle = ray.remote(num_cpus=0)(SecretStore).options(**actor_options).remote()
    ray.get(handle.put.remote(values))
    return handle


def install(handle) -> list[str]:
    """Worker: put the stored secrets into this process's environment; their names, sorted."""
    import ray

    if handle is None:
        return []
    values = ray.get(handle.get.remote())
    os.environ.update(values)
    return sorted(values)
