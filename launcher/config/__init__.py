"""The recipe schema, one module per section, and its loading from YAML; import from here.

``recipe`` holds the root ``Recipe``; ``loading`` reads, overrides and validates it; ``catalogue`` lists
the shipped recipes.
"""

from tunefleet.launcher.config.base import TINY_PREFIX, LocalPath
from tunefleet.launcher.config.cluster import KubernetesConfig, SlurmConfig
from tunefleet.launcher.config.data import CHAT_ROLES, FORMAT_FIELDS, DataConfig, DataSource, eval_metrics
from tunefleet.launcher.config.loading import RESOLVED_RECIPE, apply_overrides, load_recipe, read_yaml, recipe_from_dict
from tunefleet.launcher.config.logging import WandbConfig
from tunefleet.launcher.config.method import ADAPTER_KINDS, MethodConfig, RlConfig
from tunefleet.launcher.config.model import ModelConfig
from tunefleet.launcher.config.recipe import Recipe
from tunefleet.launcher.config.train import TrainConfig, UnfreezeStep

__all__ = [
    "ADAPTER_KINDS",
    "CHAT_ROLES",
    "FORMAT_FIELDS",
    "RESOLVED_RECIPE",
    "TINY_PREFIX",
    "DataConfig",
    "DataSource",
    "KubernetesConfig",
    "LocalPath",
    "MethodConfig",
    "ModelConfig",
    "Recipe",
    "RlConfig",
    "SlurmConfig",
    "TrainConfig",
    "UnfreezeStep",
    "WandbConfig",
    "apply_overrides",
    "eval_metrics",
    "load_recipe",
    "read_yaml",
    "recipe_from_dict",
]
