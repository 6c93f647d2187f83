"""What every recipe section shares: the pydantic base model and the path-resolving field type.

Relative paths written in a recipe file resolve against that file's folder, so a recipe and its data
travel together; paths given with ``--set`` resolve against the current directory, where the user typed
them (see ``loading.apply_overrides``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

TINY_PREFIX = "tiny:"  # `tiny:<arch>`: the project's tiny random-init test models, never a path
PACKAGE_PREFIX = "package:"  # `package:<module>/<folder>`: a folder shipped inside an installed Python package


def resolve_path(value: str, info: ValidationInfo) -> str:
    """A path written in a recipe, made absolute against the recipe's folder (``base_dir`` in the validation
    context); `tiny:` models and URLs (`s3://...`) are left as they are."""
    if value.startswith(TINY_PREFIX) or "://" in value:
        return value
    path = Path(os.path.expanduser(value))
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return os.path.normpath(path.absolute())


LocalPath = Annotated[str, AfterValidator(resolve_path)]


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, validate_by_name=True, validate_by_alias=True,
        serialize_by_alias=True,
    )
