"""Streaming frames out of files ASE reads: ASE ``.traj``, extended XYZ (plain, ``.xz``, ``.gz``).

Shared by the OC20, LiPS and generic readers. Frames are addressed by their index in the file,
so a :class:`WorkUnit` ``[start, stop)`` names the same frames whichever worker reads it.

Every failure inside ASE (a truncated trajectory raises ``JSONDecodeError`` or ``ValueError``
from deep in ULM, a bad XYZ header ``XYZError``, binary junk ``UnicodeDecodeError``) is turned
into a one-line :class:`SourceError` naming the file and, where known, the frame.
"""

from __future__ import annotations

import gzip
import io
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import ase.io
import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms

from matsci_ray.data.record import SourceError, WorkUnit

DEFAULT_CHUNK_SIZE = 2000

_OPENERS: dict[str, Callable[..., IO[Any]]] = {".xz": lzma.open, ".gz": gzip.open}
_FORMATS = {".traj": "traj", ".extxyz": "extxyz", ".xyz": "extxyz"}


def split_compression(path: str | Path) -> tuple[str, str | None]:
    """``("0.extxyz", ".xz")`` for ``0.extxyz.xz``; ``(name, None)`` when not compressed."""
    name = Path(path).name
    for suffix in _OPENERS:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def frame_format(path: str | Path) -> str | None:
    """``"traj"``, ``"extxyz"``, or ``None`` (left to ASE's own guess) for ``path``."""
    name, _ = split_compression(path)
    return _FORMATS.get(Path(name).suffix)


def base_stem(path: str | Path) -> str:
    """File name without compression and format suffixes: ``0.extxyz.xz`` -> ``0``."""
    name, _ = split_compression(path)
    return Path(name).stem


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def open_text(path: str | Path) -> IO[str]:
    """Open ``path`` as text, decompressing ``.xz``/``.gz`` on the fly."""
    _, compression = split_compression(path)
    try:
        if compression is None:
            return open(path, encoding="utf-8")
        return _OPENERS[compression](path, "rt", encoding="utf-8")
    except OSError as exc:
        raise SourceError(str(path), f"cannot open ({_describe(exc)})") from None


# --- extended XYZ: a line-level frame splitter -------------------------------------------------


def _xyz_blocks(
    path: str, start: int, stop: int | None, keep: bool = True
) -> Iterator[tuple[int, str | None]]:
    """``(index, text)`` per XYZ frame; ``text`` is ``None`` before ``start`` or if not ``keep``.

    Reads line by line and never seeks: ASE's own extxyz reader seeks back once per frame,
    which on an ``.xz`` stream rewinds and re-decompresses from the start of the file
    (a 5,000-frame OC20-sized archive did not finish a 2,000-frame slice in 10 minutes).
    ``VEC`` lattice lines (plain-XYZ cells) are not supported here.
    """
    index, line_no = 0, 0
    try:
        with open_text(path) as fh:
            while stop is None or index < stop:
                header = fh.readline()
                line_no += 1
                if not header.strip():  # end of file, or trailing blank lines (as ASE)
                    return
                try:
                    natoms = int(header)
                except ValueError:
                    natoms = -1
                if natoms < 0:
                    raise SourceError(
                        path,
                        f"line {line_no}: expected an atom count, got {header[:40]!r}",
                        str(index),
                    )
                lines = [header] if keep and index >= start else None
                for _ in range(natoms + 1):  # comment line + one line per atom
                    line = fh.readline()
                    line_no += 1
                    if not line:
                        raise SourceError(
                            path, f"truncated: file ends inside a {natoms}-atom frame", str(index)
                        )
                    if lines is not None:
                        lines.append(line)
                yield index, None if lines is None else "".join(lines)
                index += 1
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as exc:
        # Corrupt or truncated compressed stream, or binary junk that is not text.
        msg = f"unreadable after line {line_no} ({_describe(exc)})"
        raise SourceError(path, msg, str(index)) from None


def _parse_xyz_block(path: str, index: int, text: str) -> Atoms:
    try:
        atoms = ase.io.read(io.StringIO(text), format="extxyz", index=0)
    except Exception as exc:  # ASE raises anything from XYZError to IndexError on bad input
        raise SourceError(path, f"bad extended XYZ frame ({_describe(exc)})", str(index)) from None
    assert isinstance(atoms, Atoms)
    return atoms


def _iter_xyz(path: str, start: int, stop: int | None) -> Iterator[tuple[int, Atoms]]:
    if split_compression(path)[1] is not None:
        for index, text in _xyz_blocks(path, start, stop):
            if text is not None:
                yield index, _parse_xyz_block(path, index, text)
        return
    # Plain files: ASE's iread, which indexes frame offsets up to ``stop`` then parses lazily.
    index, failure = start, None
    try:
        for atoms in ase.io.iread(path, index=slice(start, stop), format="extxyz"):
            yield index, atoms
            index += 1
    except Exception as exc:
        failure = _describe(exc)
    if failure is not None:
        # ASE's offset scan fails before naming a frame: re-scan to name the frame and line
        # of a structural error; otherwise it was parsing frame ``index`` that failed.
        for _ in _xyz_blocks(path, start, stop, keep=False):
            pass
        raise SourceError(path, f"bad extended XYZ ({failure})", str(index))


# --- ASE trajectories -----------------------------------------------------------------------


def _open_traj(path: str) -> Any:
    from ase.io.trajectory import Trajectory

    try:
        return Trajectory(path, "r")
    except Exception as exc:  # ULM: ValueError on short files, InvalidULMFileError, …
        raise SourceError(path, f"not a readable ASE trajectory ({_describe(exc)})") from None


def _iter_traj(path: str, start: int, stop: int | None) -> Iterator[tuple[int, Atoms]]:
    traj = _open_traj(path)
    try:
        # The frame count comes from the header's offset table, so a truncated file still
        # reports every frame; the frame past the cut fails and names itself.
        end = len(traj) if stop is None else min(stop, len(traj))
        for index in range(start, end):
            try:
                atoms = traj[index]
            except Exception as exc:
                raise SourceError(
                    path, f"corrupt or truncated trajectory frame ({_describe(exc)})", str(index)
                ) from None
            yield index, atoms
    finally:
        traj.close()


# --- the public entry points ----------------------------------------------------------------


def count_frames(path: str | Path) -> int | None:
    """Frames in ``path`` (``.traj``/extxyz), or ``None`` for formats counted only by reading."""
    fmt = frame_format(path)
    if fmt == "traj":
        traj = _open_traj(str(path))
        try:
            return len(traj)
        finally:
            traj.close()
    if fmt == "extxyz":
        return sum(1 for _ in _xyz_blocks(str(path), 0, None, keep=False))
    return None


def iter_frames(
    path: str | Path, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, Atoms]]:
    """Stream ``(frame index, Atoms)`` for frames ``[start, stop)`` of ``path``."""
    file = str(path)
    if not Path(file).is_file():
        raise SourceError(file, "no such file")
    fmt = frame_format(file)
    if fmt == "traj":
        yield from _iter_traj(file, start, stop)
    elif fmt == "extxyz":
        yield from _iter_xyz(file, start, stop)
    else:
        index = start
        try:
            for atoms in ase.io.iread(file, index=slice(start, stop)):
                yield index, atoms
                index += 1
        except Exception as exc:
            raise SourceError(file, f"ASE cannot read it ({_describe(exc)})", str(index)) from None


def plan_frames(source: str, file: str | Path, chunk_size: int) -> list[WorkUnit]:
    """Units of at most ``chunk_size`` frames; one whole-file unit where frames aren't counted."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = count_frames(file)
    if n is None:
        return [WorkUnit(source, str(file))]
    return [
        WorkUnit(source, str(file), start, min(start + chunk_size, n))
        for start in range(0, n, chunk_size)
    ]


# --- Atoms -> canonical arrays --------------------------------------------------------------


@dataclass
class FrameArrays:
    """One frame in canonical units; ``energy``/``forces`` are ``None`` when absent."""

    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None
    forces: np.ndarray | None


def calc_results(atoms: Atoms) -> dict[str, Any]:
    """Stored calculator results (ASE >= 3.23 moves extxyz ``energy``/``forces`` there)."""
    calc = atoms.calc
    results = getattr(calc, "results", None) if calc is not None else None
    return results if isinstance(results, dict) else {}


def structure_fields(atoms: Atoms) -> dict[str, Any]:
    """``atomic_numbers``, ``positions``, ``cell``, ``pbc`` as canonical ``Record`` fields."""
    return {
        "atomic_numbers": np.asarray(atoms.numbers, dtype=np.int64).copy(),
        "positions": np.asarray(atoms.positions, dtype=np.float64).copy(),
        "cell": np.asarray(atoms.cell.array, dtype=np.float64).copy(),
        "pbc": np.asarray(atoms.pbc, dtype=bool).copy(),
    }


def atoms_to_arrays(atoms: Atoms, energy_keys: tuple[str, ...] = ("energy",)) -> FrameArrays:
    """Canonical arrays of ``atoms`` plus its energy (eV) and forces (eV/Å), if stored.

    Energy: the calculator's ``energy`` (what ``get_potential_energy()`` returns: not the
    ``free_energy`` VASP also reports), else ``atoms.info[key]``. Forces: the calculator's
    raw results, else ``atoms.arrays["forces"]``. ``atoms.get_forces()`` is avoided on
    purpose: it zeroes the forces on FixAtoms atoms, and OC20's labels are the raw DFT forces.
    Shapes are not checked here; the callers reject what does not fit.
    """
    results = calc_results(atoms)
    energy: Any = results.get("energy")
    if energy is None:
        energy = next((atoms.info[k] for k in energy_keys if k in atoms.info), None)
    forces = raw_forces(atoms)
    return FrameArrays(
        **structure_fields(atoms),
        energy=None if energy is None else _to_float(energy),
        forces=None if forces is None else forces.copy(),
    )


def raw_forces(atoms: Atoms) -> np.ndarray | None:
    """Forces as stored (calculator results, else ``atoms.arrays``), constraints not applied.

    ``ValueError`` if they are not numeric.
    """
    forces = calc_results(atoms).get("forces")
    if forces is None:
        forces = atoms.arrays.get("forces")
    try:
        return None if forces is None else np.asarray(forces, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"forces are not numeric: {forces!r:.60}") from None


def _to_float(value: Any) -> float:
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = np.asarray(None)
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise ValueError(f"energy is not one number: {value!r:.60}")
    return float(array.reshape(()))


def fixed_mask(atoms: Atoms) -> np.ndarray:
    """Atoms held by a ``FixAtoms`` constraint (extxyz ``move_mask`` reads back as one).

    Other constraints (FixCartesian, Hookean…) do not hold an atom in place, so they don't count.
    """
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[np.asarray(constraint.index, dtype=np.int64)] = True
    return mask


def tags_or_none(atoms: Atoms) -> np.ndarray | None:
    """``atoms``' tags if the file stored any, else ``None``.

    ``atoms.get_tags()`` returns zeros when there are none, which would claim every atom is
    OC20 "subsurface" (tag 0); the sample OC20 trajectories store no tags at all.
    """
    if not atoms.has("tags"):
        return None
    return np.asarray(atoms.get_tags(), dtype=np.int64).copy()
