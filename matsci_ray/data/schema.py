"""The Parquet schema of ingested shards, and the vectorised Record → Arrow conversion.

Every shard of every source has the same columns (targets a source lacks are null), so shards of
several data sets concatenate without conversion in the mixed-dataset pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from matsci_ray import keys as K
from matsci_ray.data.record import Record

# 2: every shard has page checksums and its manifest entry its size and SHA-256. A version-1
# data set lacks both, so it is refused (re-ingest) rather than read half-checked; the bump
# also changes every ingest fingerprint, so a resumed ingest rewrites its old units.
# 3: a ``stress`` column (6 Voigt components, eV/Å³). A version-2 shard lacks it, so every
# shard of a data set would not share one schema; re-ingest rather than mix.
# 4: ``stress`` is a variable-length list (6 values, or null), not a fixed-size list of 6: a
# null in a fixed-size list column does not survive Parquet before pyarrow 26 (24 and older
# refuse to write it, 25 writes a file it cannot read back), and GPU images ship older ones.
SCHEMA_VERSION = 4

_VEC3 = pa.list_(pa.float64(), 3)
_PER_ATOM_VEC3 = pa.list_(_VEC3)


def _field(name: str, type_: pa.DataType, unit: str = "", doc: str = "") -> pa.Field:
    return pa.field(name, type_, metadata={"unit": unit, "doc": doc})


_TARGET_TYPES: dict[str, pa.DataType] = {
    "scalar": pa.float64(),
    "per_atom_vector": _PER_ATOM_VEC3,
    "per_atom_int": pa.list_(pa.int8()),
    "per_atom_bool": pa.list_(pa.bool_()),
    "bool": pa.bool_(),
    "class": pa.int16(),
    "voigt": pa.list_(pa.float64()),  # 6 values (validate.py checks), or null: see version 4
}

SCHEMA = pa.schema(
    [
        _field(K.DATASET, pa.string(), doc="source data set"),
        _field(K.SAMPLE_ID, pa.string(), doc="unique within the data set"),
        _field(K.SPLIT, pa.string(), doc="train | val | test"),
        _field(K.GROUP, pa.string(), doc="split unit (OC20: system id)"),
        _field(K.MATERIAL_ID, pa.string(), doc="Materials Project id, if any"),
        _field(K.ATOMIC_NUMBERS, pa.list_(pa.int16())),
        _field(K.POSITIONS, _PER_ATOM_VEC3, "Å", "Cartesian positions"),
        _field(K.CELL, pa.list_(_VEC3, 3), "Å", "rows are lattice vectors"),
        _field(K.PBC, pa.list_(pa.bool_(), 3)),
        _field(K.NATOMS, pa.int32()),
        *(
            _field(spec.name, _TARGET_TYPES[spec.kind], spec.unit, spec.description)
            for spec in K.TARGETS.values()
        ),
    ],
    metadata={"matsci_ray.schema_version": str(SCHEMA_VERSION)},
)


def _per_atom(
    values: Sequence[np.ndarray | None], natoms: np.ndarray, type_: pa.DataType
) -> pa.Array:
    """List array of per-atom values with nulls where a record lacks them."""
    present = np.array([v is not None for v in values])
    lengths = np.where(present, natoms, 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    arrays = [np.asarray(v) for v in values if v is not None]
    if type_ == _PER_ATOM_VEC3:
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
        inner: pa.Array = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float64()), 3)
    else:
        value_type = type_.value_type
        flat = np.concatenate(arrays) if arrays else np.zeros(0)
        inner = pa.array(flat, value_type)
    mask = None if present.all() else pa.array(~present)
    return pa.ListArray.from_arrays(pa.array(offsets), inner, mask=mask)


def records_to_table(records: Sequence[Record], split: str) -> pa.Table:
    """Convert validated records of one split into an Arrow table with :data:`SCHEMA`."""
    natoms = np.array([len(r.atomic_numbers) for r in records], dtype=np.int32)
    n = len(records)
    offsets = pa.array(np.concatenate([[0], np.cumsum(natoms)]).astype(np.int32))
    numbers = np.concatenate([r.atomic_numbers for r in records]).astype(np.int16)
    positions = np.concatenate([r.positions for r in records]).reshape(-1)
    cells = np.stack([r.cell for r in records]).reshape(-1)
    pbc = np.stack([r.pbc for r in records]).reshape(-1)
    columns: dict[str, pa.Array] = {
        K.DATASET: pa.array([r.dataset for r in records], pa.string()),
        K.SAMPLE_ID: pa.array([r.sample_id for r in records], pa.string()),
        K.SPLIT: pa.array([split] * n, pa.string()),
        K.GROUP: pa.array([r.group or r.sample_id for r in records], pa.string()),
        K.MATERIAL_ID: pa.array([r.material_id for r in records], pa.string()),
        K.ATOMIC_NUMBERS: pa.ListArray.from_arrays(offsets, pa.array(numbers, pa.int16())),
        K.POSITIONS: pa.ListArray.from_arrays(
            offsets, pa.FixedSizeListArray.from_arrays(pa.array(positions, pa.float64()), 3)
        ),
        K.CELL: pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(cells, pa.float64()), 3), 3
        ),
        K.PBC: pa.FixedSizeListArray.from_arrays(pa.array(pbc, pa.bool_()), 3),
        K.NATOMS: pa.array(natoms, pa.int32()),
    }
    for name, spec in K.TARGETS.items():
        values = [r.targets.get(name) for r in records]
        type_ = _TARGET_TYPES[spec.kind]
        if spec.kind.startswith("per_atom"):
            columns[name] = _per_atom(values, natoms, type_)
        elif spec.kind == "voigt":
            columns[name] = pa.array(
                [None if v is None else np.asarray(v, np.float64).reshape(6) for v in values],
                type_,
            )
        else:
            columns[name] = pa.array(values, type_)
    return pa.Table.from_pydict(columns, schema=SCHEMA)


def per_atom_array(column: pa.ChunkedArray | pa.Array, width: int = 3) -> np.ndarray:
    """Flatten a list-of-vec3 column into one ``(total_atoms, width)`` float array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
