"""Entry point of ``matsci-ray``: parses the verb and turns known errors into one-line messages."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import import_module

from matsci_ray.errors import UserError, one_line, user_facing

# verb modules, in the order `--help` lists them
VERBS = (
    "demo",
    "ingest",
    "download",
    "verify",
    "train",
    "evaluate",
    "predict",
    "generate",
    "reconstruct",
    "study",
    "report",
)


VERBOSE_HELP = "log progress details; train, study and demo also keep Ray's own console output"


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` after the verb too (``matsci-ray train CONFIG --verbose``, and the jobs/
    entrypoints, which put the verb first). Without a default of its own, the subcommand
    leaves the global flag's value alone when it is not given there."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matsci-ray",
        description="MatSciML benchmark on Ray: ingest materials data, train and evaluate models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
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
    try:
        return int(args.func(args) or 0)
    except Exception as error:
        # Ray wraps what a task or worker raised: the user's error may sit inside it
        known = user_facing(error)
        if known is None and not isinstance(error, FileNotFoundError | ValueError):
            raise
        if args.debug:
            raise
        print(f"matsci-ray {args.verb}: error: {one_line(known or error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"matsci-ray {args.verb}: interrupted", file=sys.stderr)
        return 130


__all__ = ["UserError", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
