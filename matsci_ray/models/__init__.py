"""Encoders by name; ``build_encoder`` is the one place that maps config to a module.

The config loader checks ``model.params`` against each encoder's keyword arguments and their
annotations (:func:`encoder_signature`), so a typo fails when the config is read, before Ray
or any worker starts.
"""

from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from matsci_ray.errors import ConfigError
from matsci_ray.models.base import Encoder, EncoderOutput

ENCODERS: dict[str, str] = {
    "egnn": "matsci_ray.models.egnn:EGNN",
    "megnet": "matsci_ray.models.megnet:MEGNet",
    "gala": "matsci_ray.models.gala:GALA",
}
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


def encoder_class(name: str) -> type[Encoder]:
    if name not in ENCODERS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose from {', '.join(ENCODERS)}")
    module, cls = ENCODERS[name].split(":")
    return getattr(import_module(module), cls)


@functools.cache
def encoder_signature(name: str) -> tuple[Param, ...]:
    """The keyword arguments of encoder ``name``'s ``__init__``, annotations resolved."""
    init = encoder_class(name).__init__
    hints = typing.get_type_hints(init)
    return tuple(
        Param(p.name, hints.get(p.name, Any), p.default)
        for p in list(inspect.signature(init).parameters.values())[1:]  # without self
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


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
    "ENCODERS",
    "SET_BY_BUILDER",
    "Encoder",
    "EncoderOutput",
    "Param",
    "build_encoder",
    "encoder_class",
    "encoder_signature",
]
