"""``matsci-ray evaluate CHECKPOINT --split test``: print the metric table."""

from __future__ import annotations

import argparse
import json
import logging

from matsci_ray.storage import location


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on a split and print the metric table",
        description="Stream a split of the checkpoint's data set and print its task metrics.",
    )
    p.add_argument(
        "checkpoint", type=location, help="checkpoint directory or checkpoint.pt (path or URI)"
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data-root", type=location, help="ingest output (default: the config's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matsci_ray.ray_env import init_ray
    from matsci_ray.train.checkpoint import load_model
    from matsci_ray.train.evaluate import evaluate_model, metric_table

    model, config, _ = load_model(args.checkpoint)  # a bad checkpoint fails before Ray starts
    init_ray(args.address, num_cpus=args.num_cpus)
    if not (args.verbose or args.debug):
        _quiet_ray_data_console()
    metrics = evaluate_model(model, config, args.split, args.data_root)
    print(
        json.dumps(metrics, indent=1, sort_keys=True)
        if args.json
        else metric_table(metrics, args.split)
    )
    return 0


def _quiet_ray_data_console() -> None:
    """Keep Ray Data's progress and task tracebacks in its session log file, off the console:
    a bad shard then ends the command with one line naming it (``-v`` shows them again)."""
    for handler in logging.getLogger("ray.data").handlers:
        # Ray's own console handler only: a handler shared with other loggers (a test
        # runner's capture, an application's) keeps its level
        ours = type(handler).__module__.startswith("ray.")
        if ours and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)
