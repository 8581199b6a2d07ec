"""Entry point of ``matsci-ray``: parses the verb and turns known errors into one-line messages."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import import_module

# verb modules, in the order `--help` lists them
VERBS = ("demo", "ingest", "download", "train", "evaluate", "predict", "study", "report")


class UserError(Exception):
    """An error caused by input or configuration: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matsci-ray",
        description="MatSciML benchmark on Ray: ingest materials data, train and evaluate models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        import_module(f"matsci_ray.cli.{verb}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    from matsci_ray.data.record import SourceError
    from matsci_ray.data.shards import StrictModeError

    known = (UserError, SourceError, StrictModeError, FileNotFoundError, ValueError)
    try:
        return int(args.func(args) or 0)
    except known as error:
        if args.debug:
            raise
        print(f"matsci-ray {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"matsci-ray {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
