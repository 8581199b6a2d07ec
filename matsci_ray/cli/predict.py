"""``matsci-ray predict CHECKPOINT FILE...``: predictions for any ASE-readable structures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict every task of a checkpoint for ASE-readable files",
        description="Read structures with ASE and write one JSON line per structure "
        "(forces included for force tasks).",
    )
    p.add_argument("checkpoint", type=Path, help="checkpoint directory or checkpoint.pt")
    p.add_argument("files", nargs="+", type=Path, help="structure files (any ASE format)")
    p.add_argument("--index", default=":", help="ASE index of frames to read (default: all)")
    p.add_argument("--out", type=Path, help="write JSON lines here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ase.io

    from matsci_ray.cli.main import UserError
    from matsci_ray.inference import Predictor

    predictor = Predictor(args.checkpoint)
    out = args.out.open("w") if args.out else sys.stdout
    try:
        for path in args.files:
            frames = ase.io.iread(path, index=args.index)  # streamed, batch by batch
            try:
                for k, result in enumerate(predictor.predict_batches(frames, args.batch_size)):
                    row = {"file": str(path), "frame": k}
                    for key, value in result.items():
                        row[key] = value.tolist() if hasattr(value, "tolist") else value
                    out.write(json.dumps(row) + "\n")
            except (OSError, ValueError, KeyError, StopIteration) as error:
                raise UserError(f"{path}: cannot read structures ({error})") from None
    finally:
        if args.out:
            out.close()
    return 0
