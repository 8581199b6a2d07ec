"""What every config model shares: unknown keys refused, and YAML read into a model with one
clear line naming the file and the field when it does not validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from matsci_ray.errors import ConfigError


class StrictModel(BaseModel):
    """A config section: an unknown key is an error, not ignored (a typo would otherwise
    silently train with the default)."""

    model_config = ConfigDict(extra="forbid", frozen=False)


M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path``; a ConfigError naming it otherwise."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def validate(model: type[M], raw: dict[str, Any], path: Path) -> M:
    """``raw`` as a ``model``; the first error as one line naming ``path`` and the field."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}{given(first)}") from None


def given(error: Any) -> str:
    """`` (got 'big')`` after a message on a scalar value of the wrong type or range."""
    value = error.get("input")
    if error["type"] in ("encoder_param", "model_name", "extra_forbidden", "missing"):
        return ""
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return f" (got {value!r})"
    return ""
