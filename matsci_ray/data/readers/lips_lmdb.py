"""LiPS frames from the MatSciML LMDB devset (torch tensors), for the LiPS reader's ``.lmdb`` input.

Each value holds ``pos`` (n, 3) Å, ``cell`` (3, 3) Å rows, ``atomic_numbers`` (n,), ``pbc``
(3,) as 0/1, ``energy`` (eV, a numpy scalar) and ``force`` (n, 3) eV/Å. The tensors are
float32; they are widened to float64 as they are (no rounding is undone). Checked against
``lips/lips_devset.extxyz``: key ``i`` is frame ``i`` there, same positions, cell and labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from matsci_ray import keys
from matsci_ray.data.readers.lmdb_source import (
    RecordRejected,
    iter_lmdb,
    optional_float,
)
from matsci_ray.data.record import Record, Reject, WorkUnit


def _array(value: Any, name: str, dtype: type, shape: tuple[int | None, ...]) -> np.ndarray:
    if value is None:
        raise RecordRejected(f"missing {name}")
    if hasattr(value, "detach"):  # torch.Tensor; numpy arrays pass through
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise RecordRejected(f"unparsable {name}: {exc}") from None
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        raise RecordRejected(f"{name} has shape {array.shape}, expected {shape}")
    return array


def _energy(value: Any) -> float | None:
    if hasattr(value, "detach"):
        if value.numel() != 1:
            raise RecordRejected(f"energy tensor has {value.numel()} values")
        value = value.item()
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    return optional_float(value, "energy")


def convert_lips(record: dict[str, Any], dataset: str = "lips") -> dict[str, Any]:
    """Canonical fields of one LiPS LMDB record (keyword arguments for ``Record``)."""
    numbers = _array(record.get("atomic_numbers"), "atomic_numbers", np.int64, (None,))
    n = len(numbers)
    positions = _array(record.get("pos"), "pos", np.float64, (n, 3))
    cell = _array(record.get("cell"), "cell", np.float64, (3, 3))
    pbc_raw = record.get("pbc")
    pbc = np.ones(3, bool) if pbc_raw is None else _array(pbc_raw, "pbc", np.int64, (3,)) != 0
    targets: dict[str, Any] = {}
    energy = _energy(record.get("energy"))
    if energy is not None:
        targets[keys.ENERGY] = energy
    if record.get("force") is not None:
        targets[keys.FORCES] = _array(record["force"], "force", np.float64, (n, 3))
    if not targets:
        raise RecordRejected("neither energy nor force present")
    return {
        "dataset": dataset,
        "atomic_numbers": numbers,
        "positions": positions,
        "cell": cell,
        "pbc": pbc,
        "targets": targets,
    }


def read_lips_lmdb(unit: WorkUnit, dataset: str = "lips") -> Iterator[Record | Reject]:
    """Stream the LiPS records of one LMDB work unit (plan it with ``plan_lmdb``).

    ``sample_id`` is ``"<input id>:<key>"`` (see ``WorkUnit``); unreadable files raise
    ``SourceError``, records that cannot be converted become ``Reject``.
    """
    prefix = unit.sample_prefix
    for key, record in iter_lmdb(unit):
        try:
            fields = convert_lips(record, dataset)
        except RecordRejected as exc:
            yield Reject(unit.file, key, str(exc))
            continue
        yield Record(sample_id=f"{prefix}:{key}", source_file=unit.file, source_key=key, **fields)
