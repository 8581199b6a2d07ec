"""``matsci-ray generate CHECKPOINT -n N --out FILE.extxyz``: crystals sampled from a
generative model's prior by annealed Langevin dynamics."""

from __future__ import annotations

import argparse
from pathlib import Path

from matsci_ray.cli.main import UserError


def add_sampler_options(p: argparse.ArgumentParser) -> None:
    """The Langevin settings and output file, shared by ``generate`` and ``reconstruct``."""
    p.add_argument("--out", type=Path, required=True, help="extended XYZ file to write")
    p.add_argument(
        "--steps-per-level",
        type=int,
        default=100,
        help="Langevin steps at each noise level (CDVAE: 100)",
    )
    p.add_argument("--step-lr", type=float, default=1e-4, help="Langevin step scale (CDVAE: 1e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="crystals decoded together")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample crystals from a generative model (model.name: cdvae)",
        description="Sample crystals from a generative checkpoint's prior and write them as "
        "extended XYZ.",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory or checkpoint.pt")
    p.add_argument("-n", "--num", type=int, default=100, help="crystals to sample")
    add_sampler_options(p)
    p.set_defaults(func=run)


def langevin_of(args: argparse.Namespace) -> object:
    from matsci_ray.generative.sampling import Langevin

    if args.steps_per_level < 1 or args.step_lr <= 0 or args.batch_size < 1:
        raise UserError("--steps-per-level and --batch-size must be >= 1, --step-lr > 0")
    return Langevin(steps_per_level=args.steps_per_level, step_lr=args.step_lr)


def write_extxyz(path: Path, atoms: list[object]) -> None:
    from ase.io import write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, atoms, format="extxyz")


def run(args: argparse.Namespace) -> int:
    from matsci_ray.generative import checkpoint
    from matsci_ray.generative.metrics import summary, validity
    from matsci_ray.generative.sampling import generate

    if args.num < 1:
        raise UserError("-n must be at least 1")
    langevin = langevin_of(args)
    model, _, _ = checkpoint.load(args.checkpoint, "generate")
    crystals = generate(model, args.num, langevin, args.seed, args.batch_size)
    write_extxyz(args.out, crystals.to_atoms())
    print(f"{len(crystals)} crystals: {args.out}")
    print(summary(validity(crystals)))
    return 0
