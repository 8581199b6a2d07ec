"""Shared helpers for LMDB sources: one pickled record per key ``b"0"``, ``b"1"``, … (the
MatSciML devsets' dicts, OC20's ``torch_geometric`` ``Data``).

Records are addressed by their index in the *numerically* sorted key order (LMDB itself sorts
keys bytewise: ``b"0", b"1", b"10", …``), so a :class:`WorkUnit` over ``[start, stop)`` means
the same records whichever worker reads it. Keys that are not decimal integers (metadata keys
some LMDB writers add) are skipped: they are not records.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from matsci_ray.data.record import SourceError, WorkUnit
from matsci_ray.data.safe_pickle import safe_loads

DEFAULT_CHUNK_SIZE = 5000


@contextmanager
def open_lmdb(file: str) -> Iterator[lmdb.Environment]:
    """Open ``file`` read-only, refusing files that are not LMDBs or are truncated."""
    path = Path(file)
    if not path.is_file():
        raise SourceError(file, "no such LMDB file")
    try:
        env = lmdb.open(
            file, subdir=False, readonly=True, lock=False, readahead=False, max_readers=1
        )
    except lmdb.Error as exc:
        raise SourceError(file, f"not a readable LMDB file ({_first_line(exc)})") from None
    try:
        # LMDB maps the file; reading a page past a truncated end kills the process with
        # SIGBUS instead of raising, so check the pages the meta page claims actually exist.
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        size = os.path.getsize(file)
        if needed > size:
            raise SourceError(file, f"truncated LMDB file ({size} of {needed} bytes present)")
        yield env
    finally:
        env.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return text[0] if text else type(exc).__name__


def _is_record_key(key: bytes) -> bool:
    return key.isdigit()


def _dense_count(txn: lmdb.Transaction, entries: int) -> int | None:
    """Number of records if the keys are exactly ``b"0" … b"n-1"`` (plus non-digit keys).

    Counting only the keys that sort outside ``b"0"…b"9"`` keeps this O(metadata keys) rather
    than O(records); ``None`` sends the caller to a full key scan.
    """
    cursor = txn.cursor()
    others = 0
    if cursor.first():
        while cursor.key() < b"0":
            others += 1
            if not cursor.next():
                break
    if cursor.set_range(b":"):  # b":" sorts right after b"9"
        others += sum(1 for _ in cursor.iternext(keys=True, values=False))
    n = entries - others
    if n == 0:
        return 0
    if txn.get(str(n - 1).encode()) is not None and txn.get(str(n).encode()) is None:
        return n
    return None


def _sorted_record_keys(txn: lmdb.Transaction) -> list[bytes]:
    """Every decimal key, sorted numerically (ties such as ``b"07"``/``b"7"`` bytewise)."""
    cursor = txn.cursor()
    keys: list[bytes] = []
    if cursor.set_range(b"0"):
        for key in cursor.iternext(keys=True, values=False):
            if key >= b":":
                break
            if _is_record_key(key):
                keys.append(bytes(key))
    keys.sort(key=lambda k: (int(k), k))
    return keys


class _KeyIndex:
    """Maps record index -> key, without listing keys when they are the dense ``0…n-1``."""

    def __init__(self, txn: lmdb.Transaction, entries: int) -> None:
        self._txn = txn
        dense = _dense_count(txn, entries)
        self._keys = None if dense is not None else _sorted_record_keys(txn)
        self.count = dense if dense is not None else len(self._keys or [])

    @property
    def listed(self) -> bool:
        return self._keys is not None

    def key(self, index: int) -> bytes:
        if self._keys is not None:
            return self._keys[index]
        return str(index).encode()

    def fall_back(self) -> None:
        # A gap in what looked dense (e.g. a missing key plus a stray digit key): list them.
        self._keys = _sorted_record_keys(self._txn)
        self.count = len(self._keys)


def count_records(file: str) -> int:
    """Number of records (decimal keys) in an LMDB file."""
    with open_lmdb(file) as env, env.begin(buffers=False) as txn:
        try:
            return _KeyIndex(txn, env.stat()["entries"]).count
        except lmdb.Error as exc:
            raise SourceError(file, f"corrupt LMDB ({_first_line(exc)})") from None


def plan_lmdb(
    source: str, file: str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> list[WorkUnit]:
    """Split ``file`` into units of at most ``chunk_size`` records (index ranges)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = count_records(str(file))
    if n == 0:
        return []
    return [
        WorkUnit(source, str(file), start, min(start + chunk_size, n))
        for start in range(0, n, chunk_size)
    ]


def iter_lmdb_values(unit: WorkUnit, stride: int = 1) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, unpickled value)`` for every ``stride``-th record of ``[start, stop)``.

    Values are unpickled with :func:`safe_loads`; a refused or corrupt pickle raises
    :class:`SourceError` naming the file and key. A ``stride`` above 1 samples a file evenly.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    file = unit.file
    with open_lmdb(file) as env, env.begin(buffers=False) as txn:
        try:
            index = _KeyIndex(txn, env.stat()["entries"])
            stop = index.count if unit.stop is None else min(unit.stop, index.count)
            i = unit.start
            while i < stop:
                key = index.key(i)
                value = txn.get(key)
                if value is None:
                    if index.listed:
                        raise SourceError(file, "key vanished while reading", key.decode())
                    index.fall_back()
                    stop = index.count if unit.stop is None else min(unit.stop, index.count)
                    continue
                key_str = key.decode()
                yield key_str, safe_loads(value, file=file, key=key_str)
                i += stride
        except lmdb.Error as exc:
            raise SourceError(file, f"corrupt LMDB ({_first_line(exc)})") from None


def iter_lmdb(unit: WorkUnit) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(key, record dict)`` for the records ``[start, stop)`` of ``unit``.

    As :func:`iter_lmdb_values`, and a value that is not a dict raises :class:`SourceError`.
    """
    for key, record in iter_lmdb_values(unit):
        if not isinstance(record, dict):
            raise SourceError(unit.file, f"record is a {type(record).__name__}, not a dict", key)
        yield key, record


# --- coordinate conventions (OQMD and Carolina store fractional coordinates as "cart_coords") --

# Shortest distance a structure may have for a convention to count as plausible. It only
# chooses between readings of the same numbers; physical validation happens later, elsewhere.
PLAUSIBLE_MIN_DISTANCE = 0.5  # Å
_IMAGES = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)


def min_distance(positions: np.ndarray, cell: np.ndarray) -> float:
    """Shortest interatomic distance over the 27 nearest cell images (an upper bound)."""
    n = len(positions)
    if n < 2:
        return math.inf
    shifts = _IMAGES @ cell  # (27, 3)
    best = math.inf
    for i in range(n - 1):  # one row at a time keeps memory O(n), not O(n^2)
        d = positions[i + 1 :, None, :] - positions[i] + shifts[None, :, :]
        best = min(best, float(np.sqrt((d * d).sum(-1)).min()))
    # An atom's distance to its own images (the shortest lattice translation).
    return min(best, float(np.linalg.norm(shifts[np.any(_IMAGES != 0, axis=1)], axis=1).min()))


def _wrapped_error(frac_a: np.ndarray, frac_b: np.ndarray) -> float:
    diff = frac_a - frac_b
    return float(np.abs(diff - np.round(diff)).max()) if diff.size else 0.0


def resolve_coordinates(
    coords: np.ndarray,
    cell: np.ndarray,
    reference_frac: np.ndarray | None = None,
    tol: float = 2e-3,
) -> tuple[np.ndarray | None, str]:
    """Decide whether ``coords`` are fractional or Cartesian (Å) in ``cell``, per record.

    Returns ``(cartesian positions, convention)`` or ``(None, reason)`` when it cannot tell.
    With ``reference_frac`` (fractional coordinates from another field, e.g. OQMD's ``sites``
    rounded to 3 decimals) the coordinates must match it in one reading. Without it, a reading
    must give a plausible shortest distance (see ``PLAUSIBLE_MIN_DISTANCE``), and fractional
    coordinates must lie in the cell (-0.1 to 1.1); if both readings pass, it is ambiguous.
    """
    as_cartesian = coords
    as_fractional = coords @ cell
    if len(coords) == 1:
        # One atom: the two readings differ by a translation, the same crystal.
        return as_fractional, "fractional"
    if reference_frac is not None:
        try:
            cart_frac = np.linalg.solve(cell.T, coords.T).T
        except np.linalg.LinAlgError:
            return None, "singular cell"
        frac_ok = _wrapped_error(coords, reference_frac) <= tol
        cart_ok = _wrapped_error(cart_frac, reference_frac) <= tol
        if frac_ok:  # both: the readings agree modulo lattice translations
            return as_fractional, "fractional"
        if cart_ok:
            return as_cartesian, "cartesian"
        return None, "coordinates match the reference sites neither as fractional nor Cartesian"
    # Fractional coordinates from a CIF-like source lie in the cell, give or take wrapping.
    in_cell = bool(np.all((coords > -0.1) & (coords < 1.1)))
    frac_ok = in_cell and min_distance(as_fractional, cell) >= PLAUSIBLE_MIN_DISTANCE
    cart_ok = min_distance(as_cartesian, cell) >= PLAUSIBLE_MIN_DISTANCE
    if frac_ok and not cart_ok:
        return as_fractional, "fractional"
    if cart_ok and not frac_ok:
        return as_cartesian, "cartesian"
    if frac_ok:
        return None, "coordinates plausible both as fractional and as Cartesian"
    return None, (
        f"coordinates give atoms closer than {PLAUSIBLE_MIN_DISTANCE} Å "
        "both as fractional and as Cartesian"
    )


# --- field parsing shared by the devset readers ------------------------------------------------


class RecordRejected(ValueError):
    """Raised while converting one record; the reader turns it into a ``Reject``."""


def optional_float(value: Any, name: str) -> float | None:
    """``None`` stays ``None`` (target absent); anything not a real number is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise RecordRejected(f"unparsable {name}: {value!r:.60}")
    return float(value)


def optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise RecordRejected(f"unparsable {name}: {value!r:.60}")
    return int(value)
