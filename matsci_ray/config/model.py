"""``model:``: a registered encoder and its keyword arguments, both checked against the
registry when the config loads, so a typo or a bad plugin fails before Ray starts."""

from __future__ import annotations

import difflib
import functools
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    Strict,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError

from matsci_ray.config.base import StrictModel
from matsci_ray.errors import ConfigError
from matsci_ray.models import MODELS, SET_BY_BUILDER, encoder_class, encoder_signature


def _registered_model(name: str) -> str:
    """A registered model whose encoder imports and agrees with its registry entry: checked
    here, at load time, so a bad plugin fails before Ray or any worker starts."""
    if name not in MODELS:
        raise PydanticCustomError("model_name", MODELS.unknown(name))  # no context: verbatim
    try:
        encoder_class(name)
    except ConfigError as error:
        raise PydanticCustomError("model_name", str(error)) from None
    return name


class _RegisteredModels:
    """The JSON schema of a model name lists the registry's names, read when it is made."""

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**handler(schema), "enum": MODELS.names()}


ModelName = Annotated[str, AfterValidator(_registered_model), _RegisteredModels()]


class ModelConfig(StrictModel):
    name: ModelName = Field("egnn", description="a registered encoder")
    params: dict[str, Any] = Field(default_factory=dict, description="encoder keyword arguments")
    head_hidden: int = Field(128, gt=0)

    @field_validator("params")
    @classmethod
    def _encoder_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """``params`` checked against the encoder's keyword arguments and their types here, at
        load time: otherwise a typo fails inside a Ray Train worker, after its start-up."""
        name = info.data.get("name")
        return params if name is None else check_encoder_params(name, params)


def _annotation(hint: Any) -> Any:
    """An encoder argument's annotation as pydantic checks it, strictly (``true`` is not an
    int, ``1`` not a bool), except that a float also accepts a number YAML read as a string
    (``1e-3``, without a dot) or an int."""
    return Annotated[float, Strict(False)] if hint is float else hint


@functools.cache
def _params_model(name: str) -> type[BaseModel]:
    fields: dict[str, Any] = {
        p.name: (_annotation(p.annotation), ... if p.required else p.default)
        for p in encoder_signature(name)
        if p.name not in SET_BY_BUILDER
    }
    strict = ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True)
    return create_model(f"{name}_params", __config__=strict, **fields)


def check_encoder_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` validated for encoder ``name`` (values converted to the annotated types).

    Raises pydantic's ``ValidationError`` located at the parameter, so the config error names
    ``model.params.<key>``: an unknown key with the closest known one, a key the builder sets
    itself (``cutoff`` comes from ``data.cutoff``), or a value of the wrong type.
    """
    model = _params_model(name)
    known = list(model.model_fields)
    unknown: list[InitErrorDetails] = []
    for key, value in params.items():
        if key in SET_BY_BUILDER:
            message = f"set by {SET_BY_BUILDER[key]}; remove it here"
        elif key not in model.model_fields:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"{name} takes {', '.join(known)}"
            message = f"{name} has no parameter {key!r}; {hint}"
        else:
            continue
        error = PydanticCustomError("encoder_param", message)  # no context: taken verbatim
        unknown.append({"type": error, "loc": (key,), "input": value})
    if unknown:
        raise ValidationError.from_exception_data("params", unknown)
    return model.model_validate(params).model_dump(exclude_unset=True)
