"""``matsci-ray predict CHECKPOINT FILE...``: predictions for any ASE-readable structures."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from matsci_ray.storage import location

if TYPE_CHECKING:
    from ase import Atoms

    from matsci_ray.inference import Predictor


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict every task of a checkpoint for ASE-readable files",
        description="Read structures with ASE and write one JSON line per structure: its file, "
        "its frame index in that file, and a value per task (class tasks: the class; force "
        "tasks: the total energy, with forces under '<task>:forces'). A structure no model "
        "should score (no atoms, an element the model cannot embed, atoms closer than 0.5 Å, a "
        "degenerate cell: the checks ingest applies) ends the command naming its file and "
        "frame.",
    )
    p.add_argument(
        "checkpoint", type=location, help="checkpoint directory or checkpoint.pt (path or URI)"
    )
    p.add_argument("files", nargs="+", type=Path, help="structure files (any ASE format)")
    p.add_argument(
        "--index",
        default=":",
        help="ASE index of frames to read, e.g. 0:10:2 or --index=-2: (default: all)",
    )
    p.add_argument("--out", type=Path, help="write JSON lines here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=run)


def _read_error(path: Path, error: Exception) -> Exception:
    from matsci_ray.cli.main import UserError

    detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return UserError(f"{path}: cannot read structures ({detail})")


def _frames(path: Path, index: str) -> Iterator[Atoms]:
    """The selected frames of ``path``, streamed. ASE's parsers fail with anything from
    ``AssertionError`` to ``IndexError``, so every failure becomes one error naming the file."""
    import ase.io

    try:
        frames = iter(ase.io.iread(path, index=index))
    except Exception as error:
        raise _read_error(path, error) from None
    while True:
        try:
            atoms = next(frames)
        except StopIteration:
            return
        except Exception as error:
            raise _read_error(path, error) from None
        yield atoms


def _frame_numbers(path: Path, index: str) -> Iterable[int | None]:
    """Position in the file of each frame ``index`` selects, in reading order (``None`` for a
    selection that is not a number or slice, such as an ASE database query)."""
    from ase.io.formats import string2index

    from matsci_ray.cli.main import UserError

    try:
        selection = string2index(index)
    except ValueError:
        example = "':', '3', '-1', '0:10:2'"
        raise UserError(f"--index {index!r} is not an ASE index (e.g. {example})") from None
    if isinstance(selection, str):
        return itertools.repeat(None)
    if isinstance(selection, int):
        selection = slice(selection, selection + 1 or None)
    parts = (selection.start, selection.stop, selection.step)
    if any(part is not None and part < 0 for part in parts):
        total = sum(1 for _ in _frames(path, ":"))  # counted from the end: needs the length
        return range(total)[selection]
    return itertools.count(selection.start or 0, selection.step or 1)


def _checked(
    path: Path, frames: Iterable[Atoms], numbers: Iterable[int | None], predictor: Predictor
) -> Iterator[tuple[Atoms, int | None]]:
    """Each frame with its number in the file, after the model's structure checks: a frame no
    model should score ends the command naming the file and frame, not a number printed for
    it (a 0-atom frame) nor an ``IndexError`` from the encoder (Z = 200)."""
    from matsci_ray.errors import StructureError

    # numbers may be endless (itertools.count): the frames decide where the file ends
    for ordinal, (atoms, number) in enumerate(zip(frames, numbers, strict=False)):
        reason = predictor.check(atoms)
        if reason is not None:
            where = f"frame {number}" if number is not None else f"selected structure {ordinal}"
            raise StructureError(f"{path} [{where}]: {reason}")
        yield atoms, number


def _predict_file(path: Path, args: argparse.Namespace, predictor: Predictor, out: IO[str]) -> int:
    """Write one JSON line per selected frame of ``path``; return how many."""
    from matsci_ray.cli.main import UserError
    from matsci_ray.errors import StructureError

    pending: deque[int | None] = deque()  # numbers of frames handed on, not yet written

    def frames() -> Iterator[Atoms]:
        for atoms, number in _checked(
            path, _frames(path, args.index), _frame_numbers(path, args.index), predictor
        ):
            pending.append(number)
            yield atoms

    written = 0
    try:
        # every frame was checked by _checked, which names it by its frame number
        for result in predictor.predict_batches(frames(), args.batch_size, checked=True):
            row = {"file": str(path), "frame": pending.popleft()}
            for key, value in result.items():
                row[key] = value.tolist() if hasattr(value, "tolist") else value
            out.write(json.dumps(row) + "\n")
            written += 1
    except StructureError:
        raise  # already names the file and frame
    except ValueError as error:  # a structure the graph or model cannot take
        raise UserError(f"{path}: {error}") from None
    return written


def run(args: argparse.Namespace) -> int:
    from matsci_ray.cli.main import UserError
    from matsci_ray.inference import Predictor

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    predictor = Predictor(args.checkpoint)
    out = args.out.open("w") if args.out else sys.stdout
    try:
        for path in args.files:
            if not _predict_file(path, args, predictor, out):
                raise UserError(f"{path}: no structures read (index {args.index!r})")
    finally:
        if args.out:
            out.close()
    return 0
