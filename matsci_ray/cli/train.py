"""``matsci-ray train CONFIG``: one experiment on Ray Train."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from matsci_ray.cli.main import add_verbose
from matsci_ray.storage import Location, check, local_dir, location, uri_of

if TYPE_CHECKING:
    from matsci_ray.config import ExperimentConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on Ray Train from a YAML config",
        description="Train the config's tasks with DDP on Ray Train; checkpoints every epoch.",
    )
    p.add_argument("config", type=Path, help="experiment YAML")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 (YAML-parsed)",
    )
    p.add_argument(
        "--resume",
        type=location,
        metavar="CHECKPOINT",
        help="continue after this checkpoint's epoch (a runs/results/NAME/checkpoint_... "
        "directory or URI of the same tasks and model): weights, optimiser, schedule and "
        "data order",
    )
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    add_verbose(p)
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict[str, object]:
    from matsci_ray.cli.main import UserError

    overrides: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def run(args: argparse.Namespace) -> int:
    from matsci_ray.config import load_config

    # before torch and Ray are imported (seconds): a config error is reported at once
    config = load_config(args.config, parse_overrides(args.set))
    check(config.data.root, config.run.storage)
    from matsci_ray.console.ray_logs import RAY_LOG, ray_console

    log_file = local_dir(config.run.storage / config.name) / RAY_LOG  # a local file handler
    with ray_console(args.address, args.num_cpus, log_file, args.verbose):
        result = fit(config, resume_from=args.resume, verbose=args.verbose)
    print(
        json.dumps(
            {k: v for k, v in result.metrics.items() if "/" in k or k == "epoch"},
            indent=1,
            sort_keys=True,
        )
    )
    if result.checkpoint is not None:
        print(f"checkpoint: {checkpoint_uri(result.checkpoint)}")
    best = best_checkpoint_line(result, config)
    if best:
        print(best)
    print(f"tensorboard: tensorboard --logdir {config.run.storage / config.name / 'tensorboard'}")
    return 0


def checkpoint_uri(checkpoint: Any) -> str:
    """Where Ray put ``checkpoint``, as ``--resume`` and ``evaluate`` take it (a URI for an
    object store: Ray's own path has no scheme)."""
    return uri_of(checkpoint.filesystem, checkpoint.path)


def fit(
    config: ExperimentConfig, resume_from: Location | None = None, verbose: bool = False
) -> Any:
    """Train ``config`` on Ray Train with a line per epoch on the console; Ray's ``Result``.
    A run that failed raises its error (Ray Train's, with the user's error inside). With
    ``verbose``, Ray's own lines come in between: no progress bar redrawn among them."""
    from matsci_ray.console.run import RunProgress
    from matsci_ray.console.text import Console
    from matsci_ray.train.trainer import build_trainer

    trainer = build_trainer(config, resume_from=resume_from)
    with RunProgress.of(config, Console(tty=False) if verbose else None):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def best_checkpoint_line(result: Any, config: ExperimentConfig) -> str | None:
    """``best checkpoint: PATH (epoch N, KEY VALUE)``: the checkpoint Ray kept for the best
    primary validation metric (``result.best_checkpoints``, best last), beside the latest
    (``result.checkpoint``), which a resume continues from."""
    from matsci_ray.tasks.registry import primary_metric

    if not result.best_checkpoints:
        return None
    checkpoint, metrics = result.best_checkpoints[-1]
    key, _ = primary_metric(config.tasks)
    score = metrics.get(key)
    detail = f"epoch {metrics.get('epoch')}"
    if score is not None:
        detail += f", {key} = {score:.6g}"
    return f"best checkpoint: {checkpoint_uri(checkpoint)} ({detail})"
