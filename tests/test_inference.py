"""Inference outside training: ``Predictor``, ``matsci-ray predict`` and ``MatSciCalculator``.

No Ray: the MP and LiPS samples are ingested in-process (for the normalisers), checkpoints
come from tiny freshly built models; the force-field checkpoint gets a few optimiser steps so
its forces are large enough for a relaxation to mean something.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.optimize import FIRE

from matsci_ray.cli.main import main
from matsci_ray.config import LossConfig
from matsci_ray.data.manifest import read_manifest
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.inference import (
    MatSciCalculator,
    Predictor,
    atoms_to_columns,
    is_potential_energy,
)
from matsci_ray.tasks.registry import TASKS
from matsci_ray.train.checkpoint import load_model, save_checkpoint
from matsci_ray.train.metrics import task_losses
from tests.samples import ingest_in_process, tiny_model

LOSS = LossConfig(force_weight=1.0, energy_weight=0.1)
MP_TASKS = ["mp-formation-energy", "mp-band-gap", "mp-stability", "mp-space-group"]
FORCES = "lips-forces"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ingested")
    for source, path in (
        ("materials-project", samples / "materials_project" / "summary_docs.jsonl"),
        ("lips", samples / "lips" / "lips_devset.extxyz"),
    ):
        ingest_in_process(source, path, root)
    return root


@pytest.fixture(scope="module")
def lips_frames(samples: Path) -> list[Atoms]:
    return ase.io.read(samples / "lips" / "lips_devset.extxyz", ":8")


@pytest.fixture(scope="module")
def mp_structures(samples: Path) -> list[Atoms]:
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    lines = (samples / "materials_project" / "summary_docs.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines[:6]]
    return [AseAtomsAdaptor.get_atoms(Structure.from_dict(d["structure"])) for d in docs]


def _checkpoint(
    directory: Path, root: Path, tasks: list[str], train_on: Sequence[Atoms] = ()
) -> Path:
    model, config = tiny_model(directory.name, root, tasks)
    if train_on:  # a few steps on energies and forces, so the forces are not ~1e-5 eV/Å
        columns = atoms_to_columns(train_on)
        columns["energy"] = np.array([a.get_potential_energy() for a in train_on])
        columns["forces"] = np.empty(len(train_on), dtype=object)
        columns["forces"][:] = [a.get_forces() for a in train_on]
        rows = RadiusGraphTransform(config.data.cutoff)(columns)
        batch = rows_to_pyg_batch(rows, ["energy", "forces"])
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(30):
            optimizer.zero_grad()
            losses = task_losses(model, model(batch, forces=True), batch, LOSS)
            sum(losses.values()).backward()
            optimizer.step()
        model.eval()
    directory.mkdir(parents=True)
    save_checkpoint(directory, model, config)
    return directory


@pytest.fixture(scope="module")
def mp_ckpt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "mp", data_root, MP_TASKS)


@pytest.fixture(scope="module")
def lips_ckpt(
    data_root: Path, lips_frames: list[Atoms], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "lips", data_root, [FORCES], lips_frames)


def _direct(checkpoint: Path, structures: list[Atoms]) -> dict[str, torch.Tensor]:
    """The checkpoint's model run by hand on the structures' radius graphs."""
    model, config, _ = load_model(checkpoint)
    rows = RadiusGraphTransform(config.data.cutoff)(atoms_to_columns(structures))
    batch = rows_to_pyg_batch(rows, [])
    preds = model(batch, forces=model.needs_forces)
    out = {name: p["value"].detach() for name, p in preds.items()}
    out.update(
        {f"{name}:forces": p["forces"].detach() for name, p in preds.items() if "forces" in p}
    )
    return out


def test_predict_equals_the_model_in_physical_units(
    mp_ckpt: Path, lips_ckpt: Path, mp_structures: list[Atoms], lips_frames: list[Atoms]
) -> None:
    structures = [*mp_structures, lips_frames[0]]
    got = Predictor(mp_ckpt).predict(structures)
    direct = _direct(mp_ckpt, structures)
    for k, result in enumerate(got):
        assert set(result) == set(MP_TASKS)
        for task in ("mp-formation-energy", "mp-band-gap"):
            assert result[task] == pytest.approx(direct[task][k].item(), rel=1e-6, abs=1e-6)
        group = result["mp-space-group"]
        assert isinstance(group, int) and 1 <= group <= 230
        assert group == direct["mp-space-group"][k].argmax().item() + 1  # labels from 1
        assert result["mp-stability"] in (0, 1)
        assert result["mp-stability"] == int(direct["mp-stability"][k].item() > 0)
    # normalisers are applied: an untrained head sits near the train split's mean, in eV/atom
    stats = read_manifest(Path(load_model(mp_ckpt)[1].data.root), "materials-project")
    formation = stats["splits"]["train"]["targets"]["formation_energy_per_atom"]
    values = [r["mp-formation-energy"] for r in got]
    assert abs(np.mean(values) - formation["mean"]) < 2 * formation["std"]

    frames = lips_frames[:3]
    got = Predictor(lips_ckpt).predict(frames)
    direct = _direct(lips_ckpt, frames)
    ptr = np.cumsum([0] + [len(a) for a in frames])
    for k, (atoms, result) in enumerate(zip(frames, got, strict=True)):
        assert result[FORCES] == pytest.approx(direct[FORCES][k].item(), rel=1e-6)
        forces = result[f"{FORCES}:forces"]
        assert forces.shape == (len(atoms), 3)
        np.testing.assert_allclose(forces, direct[f"{FORCES}:forces"][ptr[k] : ptr[k + 1]])
        # total energy in eV (reference energies included): near DFT's, not near zero
        assert result[FORCES] == pytest.approx(atoms.get_potential_energy(), rel=0.05)
    assert Predictor(lips_ckpt).predict([]) == []


def test_batch_predictions_equal_one_at_a_time(
    mp_ckpt: Path, lips_ckpt: Path, mp_structures: list[Atoms], lips_frames: list[Atoms]
) -> None:
    # structures of different sizes, so a slip in per-structure slicing would show
    structures = [mp_structures[0], lips_frames[1], *mp_structures[1:4], lips_frames[2]]
    assert len({len(a) for a in structures}) > 2
    for checkpoint in (mp_ckpt, lips_ckpt):
        predictor = Predictor(checkpoint)
        batched = predictor.predict(structures)
        streamed = list(predictor.predict_batches(iter(structures), batch_size=4))
        for atoms, together, chunked in zip(structures, batched, streamed, strict=True):
            alone = predictor.predict([atoms])[0]
            for other in (together, chunked):
                assert set(other) == set(alone)
                for key, value in alone.items():
                    if isinstance(value, np.ndarray):
                        assert other[key].shape == (len(atoms), 3)
                        np.testing.assert_allclose(other[key], value, rtol=1e-4, atol=1e-6)
                    elif isinstance(value, int):
                        assert other[key] == value, key
                    else:
                        assert other[key] == pytest.approx(value, rel=1e-6), key
        with pytest.raises(ValueError, match="batch_size"):
            list(predictor.predict_batches(structures, batch_size=0))


def test_cli_writes_one_json_line_per_structure(
    lips_ckpt: Path,
    mp_structures: list[Atoms],
    lips_frames: list[Atoms],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cif, xyz = tmp_path / "crystal.cif", tmp_path / "md.extxyz"
    ase.io.write(cif, mp_structures[0])
    ase.io.write(xyz, lips_frames[:3])
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", str(lips_ckpt), str(cif), str(xyz), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["file"], r["frame"]) for r in rows] == [
        (str(cif), 0),
        (str(xyz), 0),
        (str(xyz), 1),
        (str(xyz), 2),
    ]
    structures = [ase.io.read(cif), *ase.io.read(xyz, ":")]
    expected = Predictor(lips_ckpt).predict(structures)
    for row, atoms, want in zip(rows, structures, expected, strict=True):
        assert set(row) == {"file", "frame", FORCES, f"{FORCES}:forces"}
        assert row[FORCES] == pytest.approx(want[FORCES], rel=1e-6)
        forces = np.array(row[f"{FORCES}:forces"])
        assert forces.shape == (len(atoms), 3)
        np.testing.assert_allclose(forces, want[f"{FORCES}:forces"], rtol=1e-4, atol=1e-6)

    # stdout by default; a frame selection keeps each frame's own index in the file
    for index, frames in (("1:", [1, 2]), ("-1", [2]), ("::2", [0, 2])):
        assert main(["predict", str(lips_ckpt), str(xyz), "--index", index]) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["frame"] for r in printed] == frames, index
        assert printed[-1][FORCES] == pytest.approx(rows[1 + frames[-1]][FORCES], rel=1e-6)


def test_cli_bad_input_is_one_line_naming_the_file(
    mp_ckpt: Path, mp_structures: list[Atoms], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.cif"
    ase.io.write(good, mp_structures[0])
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("this is not a CIF file\n")
    truncated = tmp_path / "truncated.xyz"
    truncated.write_text("3\ncomment\nH 0 0 0\n")
    unknown = tmp_path / "structure.unknownformat"
    unknown.write_text("1\n")
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    for bad in (garbage, truncated, unknown, empty, tmp_path / "missing.cif"):
        code = main(["predict", str(mp_ckpt), str(good), str(bad)])
        captured = capsys.readouterr()
        assert code == 2, bad
        assert len(json.loads(captured.out.splitlines()[0])) > 2  # the good file came first
        (line,) = captured.err.splitlines()
        assert line.startswith("matsci-ray predict: error:") and str(bad) in line, line
        assert "cannot read structures" in line
    for argv, message in (
        ([str(good), "--index", "5"], "no structures read"),
        ([str(good), "--index", "1:x"], "not an ASE index"),
        ([str(good), "--batch-size", "0"], "--batch-size"),
        ([str(good)], "checkpoint"),  # a missing checkpoint directory
    ):
        checkpoint = str(tmp_path / "nowhere") if message == "checkpoint" else str(mp_ckpt)
        assert main(["predict", checkpoint, *argv]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert message in line, line


def _numeric_forces(
    calc: MatSciCalculator, atoms: Atoms, pairs: list[tuple[int, int]], h: float
) -> np.ndarray:
    """``-dE/dx`` by central differences of the calculator's energy."""
    out = []
    for atom, axis in pairs:
        energies = []
        for step in (h, -h):
            displaced = atoms.copy()
            displaced.positions[atom, axis] += step
            displaced.calc = calc
            energies.append(displaced.get_potential_energy())
        out.append(-(energies[0] - energies[1]) / (2 * h))
    return np.array(out)


def test_calculator_forces_are_minus_the_energy_gradient(
    lips_ckpt: Path, lips_frames: list[Atoms]
) -> None:
    atoms = lips_frames[0].copy()
    calc = MatSciCalculator(lips_ckpt, dtype=torch.float64)
    atoms.calc = calc
    forces = atoms.get_forces()
    assert forces.shape == (len(atoms), 3) and forces.dtype == np.float64
    assert np.abs(forces).max() > 0.05  # trained a little: forces worth checking
    pairs = [
        (int(a), axis) for a in np.random.default_rng(0).choice(len(atoms), 4) for axis in (0, 1, 2)
    ]
    numeric = _numeric_forces(calc, atoms, pairs, h=1e-4)
    analytic = np.array([forces[a, axis] for a, axis in pairs])
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)

    # the float32 calculator: the same numbers to float32 precision, and the Predictor's
    single = MatSciCalculator(lips_ckpt)
    assert single.task == FORCES
    energy = single.get_potential_energy(atoms)
    assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-3)
    np.testing.assert_allclose(single.get_forces(atoms), forces, atol=1e-5)
    prediction = Predictor(lips_ckpt).predict([atoms])[0]
    assert energy == pytest.approx(prediction[FORCES], rel=1e-6)
    np.testing.assert_allclose(single.get_forces(atoms), prediction[f"{FORCES}:forces"], atol=1e-6)


def test_fire_relaxation_lowers_the_energy(lips_ckpt: Path, lips_frames: list[Atoms]) -> None:
    atoms = lips_frames[0].copy()
    atoms.positions += np.random.default_rng(1).normal(0, 0.1, atoms.positions.shape)
    atoms.calc = MatSciCalculator(lips_ckpt, dtype=torch.float64)
    start = atoms.get_potential_energy()
    start_fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    FIRE(atoms, logfile=None).run(fmax=1e-3, steps=40)
    assert atoms.get_potential_energy() < start - 0.5
    assert np.linalg.norm(atoms.get_forces(), axis=1).max() < start_fmax


def test_calculator_needs_a_total_energy_task(
    mp_ckpt: Path, data_root: Path, lips_frames: list[Atoms], tmp_path: Path
) -> None:
    # MP formation energy is per atom (intensive): not a potential energy surface
    with pytest.raises(ValueError, match=r"no total-energy task.*mp-formation-energy"):
        MatSciCalculator(mp_ckpt)
    with pytest.raises(ValueError, match=r"'mp-band-gap' is not a total-energy task"):
        MatSciCalculator(mp_ckpt, task="mp-band-gap")
    # IS2RE's relaxed energy is extensive, but it is not the energy of the given geometry
    assert TASKS["is2re"].extensive and not is_potential_energy(TASKS["is2re"])
    assert is_potential_energy(TASKS["lips-energy"]) and is_potential_energy(TASKS[FORCES])
    mixed = _checkpoint(tmp_path / "mixed", data_root, ["mp-formation-energy", "lips-energy"])
    with pytest.raises(ValueError, match=r"'mp-formation-energy' is not .* choose from: lips-e"):
        MatSciCalculator(mixed, task="mp-formation-energy")

    # an energy-only total-energy checkpoint: forces by autograd of that energy
    calc = MatSciCalculator(mixed, dtype=torch.float64)
    assert calc.task == "lips-energy"
    atoms = lips_frames[0].copy()
    atoms.calc = calc
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 0
    pairs = [(0, 0), (40, 1), (82, 2)]
    numeric = _numeric_forces(calc, atoms, pairs, h=1e-4)
    np.testing.assert_allclose([forces[a, x] for a, x in pairs], numeric, rtol=1e-6, atol=1e-9)
