"""Versioned checkpoints: model weights (normalisers and reference energies included), the
experiment config, optimiser and scheduler state. A checkpoint alone rebuilds the model and
predicts in physical units.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from matsci_ray import __version__
from matsci_ray.config import ExperimentConfig, dump_config
from matsci_ray.data.schema import SCHEMA_VERSION
from matsci_ray.errors import CheckpointError, ConfigError
from matsci_ray.potential import MatSciModel
from matsci_ray.storage import Location, exists, is_dir, is_file, location, read_bytes

FORMAT_VERSION = 2  # 2: formation energy read out from atoms (EnergyHead)
FILENAME = "checkpoint.pt"
# What a resumed run must share with its checkpoint: the weights' shapes and what they mean.
RESUME_MUST_MATCH = ("tasks", "model", "data.cutoff", "data.max_neighbors")
# Settings that may change on resume without changing what is trained (no warning).
RESUME_UNREMARKABLE = (
    "name",
    "run.storage",
    "run.max_failures",
    "run.resource_timeout_s",
    "run.worker_start_timeout_s",
    "run.fail_at_epoch",
    "run.fail_at_step",
    "run.hold_shrunk_while_file_exists",
    "run.placement",
    "run.elastic_resize_interval_s",
    "run.checkpoint_every_steps",
    "run.threads_per_worker",
    "run.cpus_per_worker",
    "data.task_cpus",
    "data.cache_graphs",
    "data.cache_max_atoms",
    "data.val_keep_max_atoms",
    "run.compile",
)

logger = logging.getLogger(__name__)


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    config: ExperimentConfig,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int = 0,
    best: float | None = None,
    stale: int = 0,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``extra``: more entries for the checkpoint (the training loop's weight average, a
    generative model's ``family``)."""
    path = Path(directory) / FILENAME
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "schema_version": SCHEMA_VERSION,
            "matsci_ray_version": __version__,
            "config": json.dumps(dump_config(config)),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch,
            "best": best,
            "stale": stale,
            "metrics": json.dumps(metrics or {}),
            **(extra or {}),
        },
        path,
    )
    return path


def read_checkpoint(path: Location | str) -> dict[str, Any]:
    """The saved state of checkpoint ``path`` (a directory or its file, local or a URI),
    loaded as tensors and plain data only; anything else is a one-line
    :class:`CheckpointError`."""
    path = location(path)
    if is_dir(path):
        path = path / FILENAME
    if not exists(path):
        raise CheckpointError(f"{path}: no checkpoint here")
    source = path if isinstance(path, Path) else io.BytesIO(read_bytes(path))
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: {_load_failure(error)}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: checkpoint format {found} is not {FORMAT_VERSION}")
    return state


def _load_failure(error: Exception) -> str:
    """One line on why ``torch.load`` refused a file. torch's own message suggests retrying
    with ``weights_only=False``: wrong for a file of unknown origin, so it is not repeated."""
    refused = re.search(r"unsupported GLOBAL (\S+)", str(error), flags=re.IGNORECASE)
    if refused:
        return (
            f"refused: it holds a Python object ({refused.group(1)}) that a matsci-ray "
            "checkpoint never holds; checkpoints are loaded as tensors and plain data only"
        )
    return f"not a readable matsci-ray checkpoint (corrupt or truncated: {type(error).__name__})"


def load_model(path: Location | str) -> tuple[MatSciModel, ExperimentConfig, dict[str, float]]:
    """Model (eval mode), its config and the metrics recorded with it; a generative model's
    checkpoint (``generate`` and ``reconstruct`` read those) is a one-line error."""
    state = read_checkpoint(path)
    if state.get("family", "predictive") != "predictive":
        raise CheckpointError(
            f"{path}: a {state['family']} model's checkpoint; it predicts no properties "
            "(use matsci-ray generate or reconstruct)"
        )
    config = ExperimentConfig.model_validate(json.loads(state["config"]))
    model = MatSciModel.from_config(config)
    load_weights(model, state["model"], path)
    model.eval()
    return model, config, json.loads(state["metrics"])


def load_weights(model: nn.Module, weights: dict[str, Any], where: object) -> None:
    """``model.load_state_dict(weights)``; weights of another architecture (another config,
    or a release that changed the model) are one :class:`CheckpointError` naming ``where``,
    not torch's list of every mismatched key."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(error).__name__
        detail = detail.rstrip(". ")
        raise CheckpointError(
            f"{where}: its weights do not fit this model ({detail[:200]}); it was written "
            "for another model config or by another matsci-ray version"
        ) from None


def load_training_state(
    state: dict[str, Any],
    model: MatSciModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    where: object = "checkpoint",
) -> tuple[int, float | None, int]:
    """Restore ``state`` (:func:`read_checkpoint` of ``where``) in place; returns ``(next
    epoch, best score, epochs without gain)``."""
    load_weights(model, state["model"], where)
    if state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), state["best"], int(state["stale"])


def checkpoint_epoch(path: Location | str) -> int:
    """How many epochs the run had trained when it wrote checkpoint ``path``."""
    return int(read_checkpoint(path)["epoch"])


def check_resume(path: Location | str, config: ExperimentConfig) -> int:
    """The epochs already trained at checkpoint ``path``, after checking that ``config`` can
    continue from it: the tasks, model and graph cutoff must be the checkpoint's (one line
    naming the first field that differs), and epochs must be left to train. Other changed
    settings are logged: the run continues with them, and the optimiser keeps the learning
    rate and weight decay it had."""
    path = location(path)
    if not exists(path):
        raise CheckpointError(
            f"{path}: no such checkpoint (--resume takes a checkpoint directory, "
            "e.g. runs/results/NAME/checkpoint_...)"
        )
    if is_dir(path) and not is_file(path / FILENAME):
        raise CheckpointError(f"{path}: not a matsci-ray checkpoint directory (no {FILENAME})")
    state = read_checkpoint(path)
    saved, given = _flatten(json.loads(state["config"])), _flatten(dump_config(config))
    differing = [k for k in sorted(saved.keys() | given.keys()) if saved.get(k) != given.get(k)]
    for key in differing:
        if _under(key, RESUME_MUST_MATCH):
            raise ConfigError(
                f"{path}: {key} is {saved.get(key)!r} in the checkpoint but {given.get(key)!r} "
                "in the config; a run resumes only with the tasks, model and cutoff it was "
                "trained with"
            )
    epoch = int(state["epoch"])
    if epoch >= config.optim.epochs:
        raise ConfigError(
            f"{path}: already trained {epoch} epochs, and optim.epochs is "
            f"{config.optim.epochs}: nothing left to resume (raise optim.epochs)"
        )
    changed = [
        f"{key} {saved.get(key)!r} -> {given.get(key)!r}"
        for key in differing
        if not _under(key, RESUME_UNREMARKABLE)
    ]
    if changed:
        logger.warning("resuming from %s with changed settings: %s", path, "; ".join(changed))
    return epoch


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"params": {"hidden_dim": 32}}}`` as ``{"model.params.hidden_dim": 32}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)
