"""Stress end to end: the canonical column, the loss and metric, training on Ray, the
calculator and a cell relaxation (each encoder's strain derivative:
tests/test_stress_derivative.py).

The physics reference is ASE's EMT: strained, rattled 4-atom Cu cells with EMT energies,
forces and stresses are written to extxyz, ingested by the ``generic`` source on a real local
Ray (``--target stress=stress``), trained on with a stress term, and the trained model relaxes
a strained cell through ``ase.filters.FrechetCellFilter``. Derivatives are checked in float64
against central differences of the energy under strain on the same graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

from matsci_ray import keys as K
from matsci_ray.config import ExperimentConfig, LossConfig
from matsci_ray.data.dataset import open_dataset, shard_paths
from matsci_ray.data.ingest import run_ingest
from matsci_ray.data.manifest import read_manifest
from matsci_ray.data.record import Record
from matsci_ray.data.schema import SCHEMA, records_to_table
from matsci_ray.data.shards import IngestOptions
from matsci_ray.data.stats import SplitStats
from matsci_ray.data.validate import check_record
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.graphs.collate import batch_targets, collate
from matsci_ray.inference import MatSciCalculator, atoms_to_columns
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.registry import TASKS
from matsci_ray.train.checkpoint import FILENAME, load_model, save_checkpoint
from matsci_ray.train.metrics import MetricSums, task_losses
from matsci_ray.train.telemetry import read_history
from matsci_ray.train.trainer import build_trainer
from tests.samples import TINY_EGNN
from tests.strain import VOIGT, emt_cells, strain_derivative
from tests.test_encoder_contract import crystals

pytestmark = pytest.mark.usefixtures("one_thread")

# The EMT cells are ingested under the LiPS data set's name, so that the registered
# ``lips-forces`` task (and a checkpoint's config) applies to them.
DATASET = "lips"
TASK = "lips-forces"
CUTOFF = 4.0


# --- the column: validation and batching -------------------------------------------------------


def _record(stress: object) -> Record:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    return Record(
        "d",
        "a",
        atoms.numbers,
        atoms.positions,
        atoms.cell.array,
        atoms.pbc,
        {K.ENERGY: -1.0, K.STRESS: stress},
    )


def test_validation_bounds_the_stress() -> None:
    assert check_record(_record(np.full(6, -2 * K.GPA))) is None
    # 20 GPa given in kbar (200) where eV/Å³ belongs: 32,000 times too large
    reason = check_record(_record(np.full(6, 200.0)))
    assert reason is not None and reason.startswith("range: stress")
    reason = check_record(_record(np.zeros((3, 3))))
    assert reason == "label: stress has shape (3, 3), expected (6,)"
    assert check_record(_record(np.array([0, 0, np.nan, 0, 0, 0]))).startswith("non-finite")
    slab = _record(np.zeros(6))
    slab.pbc = np.array([True, True, False])
    assert (
        check_record(slab) == "label: stress on a structure that is not periodic along a, b and c"
    )


def test_a_shard_with_and_without_stress_round_trips(tmp_path: Path) -> None:
    """A stress-less row is a null, and a null in a fixed-size list column does not survive
    Parquet before pyarrow 26 (24 and older refuse to write it; 25 writes a file it cannot
    read back, seen on a GPU image), so no target column is a fixed-size list."""
    assert not [
        f.name for f in SCHEMA if f.name in K.TARGETS and pa.types.is_fixed_size_list(f.type)
    ]
    stress = np.arange(6.0) * 1e-3
    pq.write_table(records_to_table([_record(stress), _record(None)], "train"), tmp_path / "s")
    read = pq.read_table(tmp_path / "s", columns=[K.STRESS])[K.STRESS].to_pylist()
    assert read[1] is None
    np.testing.assert_array_equal(read[0], stress)


def test_batches_carry_stress_with_a_mask() -> None:
    structures = crystals()
    rows = RadiusGraphTransform(CUTOFF)(atoms_to_columns(structures))
    labelled = np.arange(6.0) / 100
    column = np.empty(3, dtype=object)
    column[:] = [labelled, None, np.array([0.0, np.nan, 0, 0, 0, 0])]
    batch = rows_to_pyg_batch({**rows, K.STRESS: column}, [K.STRESS])
    assert batch.stress.shape == (3, 6) and batch.stress.dtype == torch.float32
    assert batch.stress_mask.tolist() == [True, False, False]  # NaN: missing, like None
    torch.testing.assert_close(batch.stress[0], torch.tensor(labelled, dtype=torch.float32))
    assert not batch.stress[1:].any()
    stacked = rows_to_pyg_batch({**rows, K.STRESS: np.tile(labelled, (3, 1))}, [K.STRESS])
    assert stacked.stress_mask.all()

    # force tasks read stress where a batch has the column, and collate without it
    assert K.STRESS in batch_targets([TASKS[TASK]])
    assert K.STRESS not in batch_targets([TASKS["mp-band-gap"]])
    forces = np.empty(3, dtype=object)
    forces[:] = [np.zeros((len(a), 3)) for a in structures]
    labels = {K.ENERGY: np.zeros(3), K.FORCES: forces, K.DATASET: np.array([DATASET] * 3)}
    without = collate({**rows, **labels}, batch_targets([TASKS[TASK]]), [DATASET])
    assert not hasattr(without, "stress_mask")


# --- ingest, loss, training, calculator, relaxation --------------------------------------------


@pytest.fixture(scope="module")
def emt_root(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """40 EMT Cu cells, ingested by the generic source with energy, forces and stress."""
    directory = tmp_path_factory.mktemp("emt")
    path = directory / "cu.extxyz"
    ase.io.write(path, emt_cells(40, seed=0))
    targets = {K.ENERGY: "energy", K.FORCES: "forces", K.STRESS: "stress"}
    options = IngestOptions(
        source="generic", reader_options={"targets": targets, "dataset": DATASET}
    )
    root = directory / "ingested"
    run_ingest("generic", [path], root, options, progress=False)
    return root


@pytest.mark.slow  # Ray Data reading the shards: 15 s on a busy 2-core machine
def test_ingest_round_trips_the_stress_column(emt_root: Path) -> None:
    frames = ase.io.read(emt_root.parent / "cu.extxyz", ":")
    read = {}
    for split in K.SPLITS:
        for shard in shard_paths(emt_root, DATASET, split):
            table = pq.read_table(shard, columns=[K.SAMPLE_ID, K.STRESS])
            for sample_id, stress in zip(*table.to_pydict().values(), strict=True):
                read[frame_index(sample_id)] = stress
    assert sorted(read) == list(range(len(frames)))
    for index, stress in read.items():
        np.testing.assert_allclose(stress, frames[index].get_stress(), rtol=1e-12, atol=1e-15)
    manifest = read_manifest(emt_root, DATASET)
    assert manifest["splits"]["train"]["targets"][K.STRESS]["count"] == 6 * len(
        shard_rows(emt_root, "train")
    )

    # through Ray Data, radius graphs and collation, as training reads them
    rows = open_dataset(emt_root, DATASET, "train").map_batches(
        RadiusGraphTransform(CUTOFF), batch_format="pyarrow"
    )
    (columns,) = rows.iter_batches(batch_size=64, batch_format="numpy")
    batch = collate(columns, batch_targets([TASKS[TASK]]), [DATASET])
    assert batch.stress_mask.all()
    want = np.stack([frames[frame_index(i)].get_stress() for i in columns[K.SAMPLE_ID]])
    np.testing.assert_allclose(batch.stress.numpy(), want, rtol=1e-6, atol=1e-9)


def frame_index(sample_id: str) -> int:
    return int(sample_id.rsplit(":", 1)[1])


def shard_rows(root: Path, split: str) -> list[str]:
    paths = shard_paths(root, DATASET, split)
    return [i for p in paths for i in pq.read_table(p, columns=[K.SAMPLE_ID])[0].to_pylist()]


def emt_batch(cells: list[Atoms]) -> Any:
    """EMT cells as training collates them (radius graphs, collation), without Ray."""
    columns = atoms_to_columns(cells)
    forces = np.empty(len(cells), dtype=object)
    forces[:] = [a.get_forces() for a in cells]
    columns.update(
        {
            K.ENERGY: np.array([a.get_potential_energy() for a in cells]),
            K.FORCES: forces,
            K.STRESS: np.stack([a.get_stress() for a in cells]),
            K.DATASET: np.array([DATASET] * len(cells)),
        }
    )
    rows = RadiusGraphTransform(CUTOFF)(columns)
    return collate(rows, batch_targets([TASKS[TASK]]), [DATASET])


def emt_model(cells: list[Atoms]) -> tuple[MatSciModel, ExperimentConfig]:
    """A seeded tiny EGNN under the force task, normalised on ``cells`` by the statistics
    ingest keeps (a train split's summary)."""
    stats = SplitStats()
    for atoms in cells:
        labels = {K.ENERGY: atoms.get_potential_energy(), K.FORCES: atoms.get_forces()}
        stats.add(atoms.numbers, {**labels, K.STRESS: atoms.get_stress()})
    config = ExperimentConfig.model_validate(
        {
            "name": "emt-stress",
            "tasks": [TASK],
            "data": {"root": "unused", "cutoff": CUTOFF},
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
            "loss": {"force_weight": 1.0, "stress_weight": 10.0},
        }
    )
    torch.manual_seed(0)
    model = MatSciModel.from_config(config)
    model.fit_normalisation({DATASET: stats.summary()})
    return model, config


def test_stress_loss_and_metric() -> None:
    cells = emt_cells(8, seed=2)
    model, _ = emt_model(cells)
    batch = emt_batch(cells)
    rms = batch.stress.double().pow(2).mean().sqrt().item()
    assert model.head(TASK).stress_scale.item() == pytest.approx(rms, rel=1e-5)  # fitted
    preds = model(batch)
    assert K.STRESS in preds[TASK]  # the batch carries stress: computed by default
    off = task_losses(model, preds, batch, LossConfig())[TASK]
    on = task_losses(model, preds, batch, LossConfig(stress_weight=2.0))[TASK]
    error = (preds[TASK][K.STRESS] - batch.stress) / model.head(TASK).stress_scale
    torch.testing.assert_close(on - off, 2.0 * error.pow(2).mean())
    sums = MetricSums(model, distributed=False)
    sums.update(preds, batch)
    want = (preds[TASK][K.STRESS] - batch.stress).abs().mean().item()
    assert sums.compute()[f"{TASK}/stress_mae"] == pytest.approx(want, rel=1e-5)
    # a batch without stress labels: no stress computed, no stress metric or loss
    batch.stress_mask[:] = False
    preds = model(batch)
    assert K.STRESS not in preds[TASK]
    unlabelled = MetricSums(model, distributed=False)
    unlabelled.update(preds, batch)
    assert f"{TASK}/stress_mae" not in unlabelled.compute()
    torch.testing.assert_close(
        task_losses(model, preds, batch, LossConfig(stress_weight=2.0))[TASK], off
    )


def test_a_checkpoint_from_before_stress_loads(tmp_path: Path) -> None:
    model, config = emt_model(emt_cells(4, seed=3))
    save_checkpoint(tmp_path, model, config)
    state = torch.load(tmp_path / FILENAME, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.endswith("stress_scale")}
    torch.save(state, tmp_path / FILENAME)
    loaded, _, _ = load_model(tmp_path)
    assert loaded.head(TASK).stress_scale.item() == pytest.approx(K.GPA)  # the default
    for key, value in state["model"].items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


@pytest.mark.slow
def test_ray_training_reports_stress(emt_root: Path, tmp_path: Path) -> None:
    """``loss.stress_weight`` through Ray Train: the stress column is read from the shards,
    learned, and its MAE reported for training and validation."""
    config = ExperimentConfig.model_validate(
        {
            "name": "emt-ray",
            "tasks": [TASK],
            "data": {"root": str(emt_root), "cutoff": CUTOFF, "batch_size": 16},
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
            "loss": {"force_weight": 1.0, "stress_weight": 10.0},
            "optim": {"lr": 3e-3, "epochs": 2, "scheduler": "none"},
            "run": {
                "num_workers": 1,
                "storage": str(tmp_path / "runs"),
                "threads_per_worker": 1,
            },
        }
    )
    result = build_trainer(config).fit()
    assert result.error is None
    history = read_history(config.run.storage / config.name)
    for row in history:
        for key in (f"train/{TASK}/stress_mae", f"val/{TASK}/stress_mae"):
            assert 0 < row[key] < 1, (key, row)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """A checkpoint trained on 32 EMT cells' energies, forces and stresses, and the stress
    MAE (eV/Å³) on 8 other cells before and after."""
    cells = emt_cells(32, seed=0)
    model, config = emt_model(cells)
    train = [emt_batch(cells)]
    held_out = [emt_batch(emt_cells(8, seed=1))]

    def stress_mae() -> float:
        sums = MetricSums(model, distributed=False)
        for batch in held_out:
            sums.update(model(batch), batch)
        return sums.compute()[f"{TASK}/stress_mae"]

    before = stress_mae()
    steps = 200
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)  # a calm end
    model.train()
    for _ in range(steps):
        for batch in train:
            optimizer.zero_grad()
            sum(task_losses(model, model(batch), batch, config.loss).values()).backward()
            optimizer.step()
        schedule.step()
    model.eval()
    after = stress_mae()
    directory = tmp_path_factory.mktemp("emt-ckpt")
    save_checkpoint(directory, model, config)
    return directory, [before, after]


@pytest.mark.slow  # with the trained fixture: 10 s, minutes on a loaded machine
def test_training_with_a_stress_term_lowers_the_stress_error(trained: tuple) -> None:
    _, (before, after) = trained
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow  # with the trained fixture: 10 s, minutes on a loaded machine
def test_calculator_stress_is_the_strain_derivative(trained: tuple) -> None:
    checkpoint, _ = trained
    calc = MatSciCalculator(checkpoint, dtype=torch.float64)
    assert "stress" in calc.implemented_properties
    atoms = emt_cells(1, seed=7)[0]
    atoms.calc = calc
    stress = atoms.get_stress()
    assert stress.shape == (6,) and stress.dtype == np.float64

    def energy_of(deformation: np.ndarray) -> float:
        other = atoms.copy()
        other.set_cell(atoms.cell.array @ deformation, scale_atoms=True)
        return calc.get_potential_energy(other)

    numeric = strain_derivative(energy_of, atoms.get_volume(), 1e-5)[VOIGT]
    np.testing.assert_allclose(stress, numeric, rtol=1e-5, atol=1e-5 * abs(stress).max())
    # a cluster (no periodic cell) has energy and forces but no stress
    cluster = atoms.copy()
    cluster.pbc = False
    cluster.calc = calc
    assert np.isfinite(cluster.get_forces()).all()
    with pytest.raises(PropertyNotImplementedError):
        cluster.get_stress()


@pytest.mark.slow  # with the trained fixture: 10 s, minutes on a loaded machine
def test_cell_relaxation_lowers_the_energy_and_the_stress(trained: tuple) -> None:
    checkpoint, _ = trained
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.set_cell(atoms.cell.array @ [[1.03, 0.01, 0], [0.01, 0.98, 0], [0, 0, 1.02]], True)
    atoms.calc = MatSciCalculator(checkpoint, dtype=torch.float64)
    start_energy = atoms.get_potential_energy()
    start_stress = np.abs(atoms.get_stress()).max()
    FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-3, steps=200)
    assert atoms.get_potential_energy() < start_energy
    assert np.abs(atoms.get_stress()).max() < 0.1 * start_stress
    # the relaxed cell is EMT's (a ≈ 3.59 Å), to what a tiny model learns from 32 cells
    lengths = atoms.cell.lengths()
    assert np.abs(lengths - 3.59).max() < 0.05, lengths


def test_generic_reader_refuses_a_stress_of_the_wrong_shape(tmp_path: Path) -> None:
    from matsci_ray.data.readers import get_reader
    from matsci_ray.data.record import Reject, WorkUnit

    atoms = emt_cells(1, seed=1)[0]
    atoms.info["bad"] = np.zeros(4)
    ase.io.write(tmp_path / "x.extxyz", [atoms])
    reader = get_reader("generic", targets={K.STRESS: "bad"})
    (got,) = reader.read(WorkUnit("generic", str(tmp_path / "x.extxyz")))
    assert isinstance(got, Reject) and "3×3 tensor or 6 Voigt" in got.reason
    good = get_reader("generic", targets={K.STRESS: "stress"})
    (record,) = good.read(WorkUnit("generic", str(tmp_path / "x.extxyz")))
    np.testing.assert_allclose(record.targets[K.STRESS], atoms.get_stress())
