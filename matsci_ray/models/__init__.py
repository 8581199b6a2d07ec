"""Encoders by name; ``build_encoder`` is the one place that maps config to a module."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from matsci_ray.models.base import Encoder, EncoderOutput

ENCODERS: dict[str, str] = {
    "egnn": "matsci_ray.models.egnn:EGNN",
    "megnet": "matsci_ray.models.megnet:MEGNet",
    "gala": "matsci_ray.models.gala:GALA",
}


def build_encoder(name: str, cutoff: float, params: dict[str, Any]) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(ENCODERS)}")
    module, cls = ENCODERS[name].split(":")
    return getattr(import_module(module), cls)(cutoff=cutoff, **params)


__all__ = ["ENCODERS", "Encoder", "EncoderOutput", "build_encoder"]
