"""Generative checkpoints: the predictive format (:mod:`matsci_ray.train.checkpoint`, version
and weights-only loading) plus ``family``, so a command refuses a checkpoint of the other
family in one line instead of failing on its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matsci_ray.config import ExperimentConfig
from matsci_ray.errors import CheckpointError
from matsci_ray.generative.model import CDVAE
from matsci_ray.models import build_encoder
from matsci_ray.train.checkpoint import load_weights, read_checkpoint, save_checkpoint

FAMILY = "generative"


def save(directory: Path, model: CDVAE, config: ExperimentConfig, **training: Any) -> Path:
    """Write ``model`` and ``config`` with ``training`` state (``optimizer``, ``scheduler``,
    ``epoch``, ``best``, ``stale``, ``metrics``: :func:`save_checkpoint`'s), marked as
    generative."""
    return save_checkpoint(directory, model, config, **training, extra={"family": FAMILY})


def read(path: Path | str, verb: str) -> dict[str, Any]:
    """A generative checkpoint's state; a predictive one is a one-line :class:`CheckpointError`
    saying what it is and what ``verb`` needs."""
    state = read_checkpoint(path)
    if state.get("family") != FAMILY:
        model = json.loads(state["config"]).get("model", {}).get("name", "?")
        raise CheckpointError(
            f"{path}: a {model} checkpoint of a predictive model; {verb} needs a generative "
            "model's (model.name: cdvae)"
        )
    return state


def build(config: ExperimentConfig) -> CDVAE:
    model = build_encoder(config.model.name, config.data.cutoff, dict(config.model.params))
    if not isinstance(model, CDVAE):
        raise CheckpointError(f"model {config.model.name} is not a generative model")
    return model


def load(path: Path | str, verb: str) -> tuple[CDVAE, ExperimentConfig, dict[str, float]]:
    """The model (eval mode), its config and the metrics recorded with it."""
    state = read(path, verb)
    config = ExperimentConfig.model_validate(json.loads(state["config"]))
    model = build(config)
    load_weights(model, state["model"], path)
    model.eval()
    return model, config, json.loads(state["metrics"])
