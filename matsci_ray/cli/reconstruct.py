"""``matsci-ray reconstruct CHECKPOINT --split test --out FILE``: each crystal of a split
encoded and decoded by a generative model, with CDVAE's match rate and RMSE."""

from __future__ import annotations

import argparse
from pathlib import Path

from matsci_ray.cli.generate import add_sampler_options, langevin_of, write_extxyz


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reconstruct",
        help="encode and decode a split with a generative model; match rate and RMSE",
        description="Reconstruct a split's crystals (latent mean, annealed Langevin decoding), "
        "write them as extended XYZ and print the match rate and RMSE against the originals.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory or checkpoint.pt")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data-root", type=Path, help="ingest output (default: the config's)")
    p.add_argument("--limit", type=int, help="the split's first N crystals only")
    add_sampler_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from matsci_ray.generative import checkpoint
    from matsci_ray.generative.data import crystals_of, graph_batches
    from matsci_ray.generative.metrics import match, summary
    from matsci_ray.generative.sampling import Crystals, reconstruct
    from matsci_ray.tasks.registry import TASKS

    langevin = langevin_of(args)
    model, config, _ = checkpoint.load(args.checkpoint, "reconstruct")
    dataset = TASKS[config.tasks[0]].dataset
    root = args.data_root or config.data.root
    generator = torch.Generator().manual_seed(args.seed)
    originals, rebuilt = [], []
    for batch in graph_batches(
        root, dataset, args.split, config.data.cutoff, args.batch_size, args.limit
    ):
        originals.append(crystals_of(batch))
        rebuilt.append(reconstruct(model, batch, langevin, generator))
    reference, predicted = Crystals.concat(originals), Crystals.concat(rebuilt)
    write_extxyz(args.out, predicted.to_atoms())
    print(f"{len(predicted)} reconstructions of {dataset}/{args.split}: {args.out}")
    print(summary(match(predicted, reference)))
    return 0
