"""Encoders by name; ``build_encoder`` is the one place that maps config to a module.

Names and facts come from the registry (:mod:`matsci_ray.models.registry`). The config loader
checks ``model.params`` against each encoder's keyword arguments and their annotations
(:func:`encoder_signature`), so a typo fails when the config is read, before Ray or any worker
starts.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from matsci_ray.errors import ConfigError
from matsci_ray.models.registry import MODELS, ModelSpec, model_names
from matsci_ray.plugins import load_target

if TYPE_CHECKING:  # torch is imported with the first encoder, not with the registry
    from matsci_ray.models.base import Encoder

# Keyword arguments build_encoder sets itself, and the config field each comes from: the
# encoder's envelope must end where the neighbour list does.
SET_BY_BUILDER: dict[str, str] = {"cutoff": "data.cutoff"}


@dataclass(frozen=True)
class Param:
    """One keyword argument of an encoder: its annotation (``Any`` if none) and default."""

    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


@functools.cache
def encoder_class(name: str) -> type[Encoder]:
    """Encoder ``name``'s class, imported now; its spec is checked against its arguments."""
    from matsci_ray.models.base import Encoder

    if name not in MODELS:
        raise ConfigError(f"model.name: {MODELS.unknown(name)}")
    spec = MODELS.get(name)
    try:
        cls = load_target(spec.encoder)
    except ConfigError as error:
        raise ConfigError(f"model {name}: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise ConfigError(f"model {name}: {spec.encoder} is not an Encoder subclass")
    _check_spec(spec, [p.name for p in _signature(cls)])
    return cls


def _check_spec(spec: ModelSpec, takes: list[str]) -> None:
    """Every argument the spec names is one the encoder takes (and the builder leaves open)."""
    if spec.width == spec.depth:
        raise ConfigError(f"model {spec.name}: width and depth are both {spec.width!r}")
    named = [("width", spec.width), ("depth", spec.depth)]
    named += [("small setting", key) for key in spec.small]
    open_ = [t for t in takes if t not in SET_BY_BUILDER]
    for role, arg in named:
        if arg not in open_:
            raise ConfigError(
                f"model {spec.name}: {role} {arg!r} is not a keyword argument of "
                f"{spec.encoder}; it takes {', '.join(open_)}"
            )


def model_spec(name: str) -> ModelSpec:
    """Model ``name``'s registry entry, checked against its encoder."""
    encoder_class(name)
    return MODELS.get(name)


def _signature(cls: type) -> tuple[Param, ...]:
    init = cls.__init__  # type: ignore[misc]
    hints = typing.get_type_hints(init)
    return tuple(
        Param(p.name, hints.get(p.name, Any), p.default)
        for p in list(inspect.signature(init).parameters.values())[1:]  # without self
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


@functools.cache
def encoder_signature(name: str) -> tuple[Param, ...]:
    """The keyword arguments of encoder ``name``'s ``__init__``, annotations resolved."""
    return _signature(encoder_class(name))


def build_encoder(name: str, cutoff: float, params: dict[str, Any]) -> Encoder:
    """Encoder ``name`` with ``params``; a value the encoder refuses (GALA's ``dim`` not
    divisible by ``heads``) is a :class:`ConfigError`, so Ray Train does not retry it."""
    clash = sorted(set(params) & set(SET_BY_BUILDER))
    if clash:
        key = clash[0]
        raise ConfigError(f"model.params.{key}: set by {SET_BY_BUILDER[key]}; remove it here")
    encoder = encoder_class(name)
    try:
        return encoder(cutoff=cutoff, **params)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model.params: {name}: {error}") from error


__all__ = [
    "MODELS",
    "SET_BY_BUILDER",
    "ModelSpec",
    "Param",
    "build_encoder",
    "encoder_class",
    "encoder_signature",
    "model_names",
    "model_spec",
]
