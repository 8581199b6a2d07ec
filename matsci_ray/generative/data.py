"""Crystals of an ingested split, streamed in batches on one process (``reconstruct``, the
benchmark's evaluation, training statistics), and the statistics CDVAE normalises with.

Training reads through Ray Data like every run (:mod:`matsci_ray.generative.train`); here the
split's shards are read row group by row group (:func:`~matsci_ray.data.integrity.read_shard`,
checksums verified), so no split is held in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from matsci_ray import keys as K
from matsci_ray.data.dataset import split_shards
from matsci_ray.data.integrity import read_shard
from matsci_ray.data.stats import Moments
from matsci_ray.generative.lattice import matrix_to_params, scaled_params
from matsci_ray.generative.sampling import Crystals
from matsci_ray.graphs.batching import RadiusGraphTransform
from matsci_ray.graphs.collate import collate

GEOMETRY = [K.DATASET, K.SAMPLE_ID, K.ATOMIC_NUMBERS, K.POSITIONS, K.CELL, K.PBC, K.NATOMS]


def row_batches(
    root: Path,
    dataset: str,
    split: str,
    columns: list[str],
    batch_size: int,
    limit: int | None = None,
) -> Iterator[pa.Table]:
    """Tables of at most ``batch_size`` rows of ``dataset``/``split``, the first ``limit``."""
    left = limit if limit is not None else float("inf")
    for shard in split_shards(root, dataset, split):
        for table in read_shard(shard.path, shard.path, columns, shard):
            for start in range(0, table.num_rows, batch_size):
                if left <= 0:
                    return
                part = table.slice(start, int(min(batch_size, left)))
                left -= part.num_rows
                yield part


def graph_batches(
    root: Path,
    dataset: str,
    split: str,
    cutoff: float,
    batch_size: int,
    limit: int | None = None,
    targets: tuple[str, ...] = (),
) -> Iterator[Any]:
    """PyG batches (radius graphs at ``cutoff``) of ``dataset``/``split``, as training sees them."""
    transform = RadiusGraphTransform(cutoff)
    for table in row_batches(root, dataset, split, GEOMETRY + list(targets), batch_size, limit):
        rows = transform(table).to_pydict()
        yield collate({k: np.asarray(v, dtype=object) for k, v in rows.items()}, targets, [dataset])


def crystals_of(batch: Any) -> Crystals:
    """The crystals of a PyG batch (positions made fractional in their own cells)."""
    counts = batch.natoms.cpu().numpy()
    sections = np.cumsum(counts)[:-1]
    cells = batch.cell.double().cpu().numpy()
    pos = batch.pos.double().cpu().numpy()
    index = np.repeat(np.arange(len(counts)), counts)
    frac = np.einsum("ni,nij->nj", pos, np.linalg.inv(cells)[index])
    return Crystals(np.split(batch.z.cpu().numpy(), sections), np.split(frac, sections), cells)


def crystals(
    root: Path, dataset: str, split: str, limit: int | None = None, batch_size: int = 256
) -> Crystals:
    """The first ``limit`` crystals of a split (evaluation references; keep ``limit`` modest)."""
    parts = []
    for table in row_batches(root, dataset, split, GEOMETRY, batch_size, limit):
        cells = np.asarray(table.column(K.CELL).to_pylist(), dtype=float).reshape(-1, 3, 3)
        numbers = [
            np.asarray(z, dtype=np.int64) for z in table.column(K.ATOMIC_NUMBERS).to_pylist()
        ]
        pos = [np.asarray(p, dtype=float) for p in table.column(K.POSITIONS).to_pylist()]
        frac = [p @ np.linalg.inv(c) for p, c in zip(pos, cells, strict=True)]
        parts.append(Crystals(numbers, frac, cells))
    return Crystals.concat(parts)


def normalisation_stats(root: Path, dataset: str, target: str | None) -> dict[str, Any]:
    """Means and standard deviations of the train split's scaled lattice parameters and of
    ``target``, streamed over its row groups (a few numbers per crystal)."""
    lattice = [Moments() for _ in range(6)]
    prop = Moments()
    columns = [K.CELL, K.NATOMS] + ([target] if target else [])
    for table in row_batches(root, dataset, "train", columns, 4096):
        cells = torch.tensor(np.asarray(table.column(K.CELL).to_pylist(), dtype=float))
        natoms = torch.tensor(table.column(K.NATOMS).to_numpy())
        scaled = scaled_params(matrix_to_params(cells.reshape(-1, 3, 3)), natoms).numpy()
        for k, moments in enumerate(lattice):
            moments.add(scaled[:, k])
        if target:
            values = np.asarray(table.column(target).to_pylist(), dtype=object)
            prop.add(np.asarray([v for v in values if v is not None], dtype=float))
    summaries = [m.summary() for m in lattice]
    stats = {"lattice": {key: [s[key] for s in summaries] for key in ("mean", "std")}}
    prop_summary = prop.summary()
    stats["property"] = {k: prop_summary.get(k, d) for k, d in (("mean", 0.0), ("std", 1.0))}
    return stats
