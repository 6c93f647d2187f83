"""The `logging` section: metrics, the console and Weights & Biases."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunefleet.launcher.config.base import Section


class WandbConfig(Section):
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; default online with an API key, else offline."
    )
    project: str = Field("tunefleet", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    name: str | None = Field(None, description="Run name; default the recipe name.")
    group: str | None = Field(None, description="Run group.")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class LoggingConfig(Section):
    every_steps: int = Field(1, ge=1, description="Log training metrics every N steps.")
    console: bool = Field(True, description="Show a progress bar and a summary on the console.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases settings.")
