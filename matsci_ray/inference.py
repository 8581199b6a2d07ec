"""Predicting with a checkpoint outside training: on ASE ``Atoms`` and as an ASE calculator.

The same graph transform and collation as training are used, so a structure is seen by the
model exactly as it was during training. Every structure is first judged by the checks ingest
applies to a record's geometry (:func:`matsci_ray.data.validate.check_structure`): one that no
model should score (no atoms, an element the model cannot embed, atoms on top of each other, a
degenerate cell) raises :class:`~matsci_ray.errors.StructureError` instead of a number.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from torch_geometric.data import Batch

from matsci_ray import keys as K
from matsci_ray.data.validate import MAX_Z, PREDICT_LIMITS, Structure, check_structure
from matsci_ray.errors import StructureError
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.models.blocks import AtomEmbedding
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.registry import TaskSpec
from matsci_ray.train.checkpoint import load_model


def atoms_to_columns(structures: Sequence[Atoms]) -> dict[str, np.ndarray]:
    """Columnar batch (as Ray Data hands to ``map_batches``) from ASE structures."""

    def objects(values: list[np.ndarray]) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {
        K.ATOMIC_NUMBERS: objects([a.numbers.astype(np.int64) for a in structures]),
        K.POSITIONS: objects([a.positions.astype(np.float64) for a in structures]),
        K.CELL: np.stack([a.cell.array.astype(np.float64) for a in structures]),
        K.PBC: np.stack([a.pbc.astype(bool) for a in structures]),
        K.NATOMS: np.array([len(a) for a in structures], dtype=np.int32),
    }


def embeddable_z(model: torch.nn.Module) -> int:
    """The largest atomic number every atom embedding of ``model`` has a row for: a larger one
    would index past the table (an ``IndexError`` deep in the encoder)."""
    sizes = [
        m.embedding.num_embeddings - 1 for m in model.modules() if isinstance(m, AtomEmbedding)
    ]
    return min([MAX_Z, *sizes])


class Predictor:
    """A checkpoint ready to predict every task it was trained on, in physical units.

    ``dtype=torch.float64`` runs the model in double precision on the structures' float64
    geometry (collation alone would round positions to float32), e.g. for finite differences.
    """

    def __init__(
        self, checkpoint: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        model, config, _ = load_model(checkpoint)
        self.model: MatSciModel = model.to(device=device, dtype=dtype)
        self.config = config
        self.device = device
        self.dtype = dtype
        self.transform = RadiusGraphTransform(config.data.cutoff, config.data.max_neighbors)
        self.max_z = embeddable_z(self.model)
        self.elements = self.model.encoder.elements

    def check(self, atoms: Atoms) -> str | None:
        """Why the model must not score ``atoms`` (``"category: detail"``, as ingest words a
        reject), or ``None``."""
        structure = Structure(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc)
        return check_structure(structure, PREDICT_LIMITS, self.max_z, self.elements)

    def _refuse_unsound(self, atoms: Atoms, index: int) -> None:
        reason = self.check(atoms)
        if reason is not None:
            raise StructureError(f"structure {index}: {reason}")

    def batch(self, structures: Sequence[Atoms]) -> Batch:
        """The structures as the model sees them in training: radius graphs, one PyG batch."""
        rows = self.transform(atoms_to_columns(structures))
        batch = rows_to_pyg_batch(rows, [])
        if self.dtype != torch.float32:
            batch.pos = torch.from_numpy(np.concatenate([a.positions for a in structures]))
            batch.cell = torch.from_numpy(np.stack([a.cell.array for a in structures]))
            for name in ("pos", "cell", "cell_offsets"):
                batch[name] = batch[name].to(self.dtype)
        return batch.to(self.device)

    def predict(self, structures: Sequence[Atoms], forces: bool = True) -> list[dict[str, Any]]:
        """Per structure: ``{task: value}`` (class tasks: the class, space groups from 1), plus
        ``"<task>:forces"`` (n, 3) eV/Å for force tasks, whose value is the total energy.
        Raises :class:`StructureError` naming the first structure :meth:`check` refuses."""
        for index, atoms in enumerate(structures):
            self._refuse_unsound(atoms, index)
        return self._predict(structures, forces)

    def _predict(self, structures: Sequence[Atoms], forces: bool) -> list[dict[str, Any]]:
        if not structures:
            return []
        batch = self.batch(structures)
        forces = forces and self.model.needs_forces
        with torch.set_grad_enabled(forces):
            preds = self.model(batch, forces=forces)
        results: list[dict[str, Any]] = [{} for _ in structures]
        ptr = batch.ptr.tolist()
        for name, out in preds.items():
            head = self.model.head(name)
            value = out["value"].detach().cpu()
            value = head.predict(value)
            if head.task.kind == "multiclass":  # labels are numbered from the target's low
                value = value + int(K.TARGETS[head.task.target].low or 0)
            for k, result in enumerate(results):
                result[name] = value[k].item()
                if "forces" in out:
                    result[f"{name}:forces"] = (
                        out["forces"][ptr[k] : ptr[k + 1]].detach().cpu().numpy()
                    )
        return results

    def predict_batches(
        self, structures: Iterable[Atoms], batch_size: int = 32, checked: bool = False
    ) -> Iterator[dict[str, Any]]:
        """:meth:`predict` over a stream, ``batch_size`` structures at a time; a refused
        structure is named by its position in the whole stream (``checked``: the caller ran
        :meth:`check` on every structure already)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        chunk: list[Atoms] = []
        for index, atoms in enumerate(structures):
            if not checked:
                self._refuse_unsound(atoms, index)
            chunk.append(atoms)
            if len(chunk) == batch_size:
                yield from self._predict(chunk, forces=True)
                chunk = []
        if chunk:
            yield from self._predict(chunk, forces=True)


def is_potential_energy(task: TaskSpec) -> bool:
    """Whether a task predicts the total energy of the structure it is given (eV), so its
    negative gradient is the forces: force tasks and total-energy regressions. Not intensive
    targets (formation energy per atom), nor IS2RE's relaxed energy (a property of the
    relaxation's end point, not of the given geometry)."""
    return task.kind == "forces" or task.target == K.ENERGY


class MatSciCalculator(Calculator):
    """ASE calculator: energy, conservative forces and stress from a checkpoint's energy task.

    ``task`` picks the head (default: the first force task, else the first total-energy task),
    so a trained model can drive ``ase.optimize``, molecular dynamics, and cell relaxations
    (``ase.filters.FrechetCellFilter``). Forces are always ``-dE/dpositions`` of that head, and
    stress ``(1/V) dE/dε`` in eV/Å³ (ASE's sign and Voigt order), both by autograd; a structure
    not periodic in all three directions has no stress (ASE raises
    ``PropertyNotImplementedError`` when it is asked for).
    """

    implemented_properties = ["energy", "forces", "free_energy", "stress"]  # noqa: RUF012

    def __init__(
        self,
        checkpoint: Path | str,
        task: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.predictor = Predictor(checkpoint, device, dtype)
        tasks = self.predictor.model.tasks
        energy_tasks = [n for n, t in tasks.items() if is_potential_energy(t)]
        if task is None:
            forces = [n for n in energy_tasks if tasks[n].kind == "forces"]
            task = (forces or energy_tasks or [None])[0]
            if task is None:
                raise ValueError(
                    f"{checkpoint}: no total-energy task to use as a potential (tasks: "
                    f"{', '.join(tasks)}); per-atom formation energies, relaxed energies and "
                    "other properties are not potential energies"
                )
        if task not in energy_tasks:
            raise ValueError(
                f"{checkpoint}: task {task!r} is not a total-energy task of this checkpoint; "
                f"choose from: {', '.join(energy_tasks) or 'none'}"
            )
        self.task: str = task

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        reason = self.predictor.check(self.atoms)
        if reason is not None:  # a relaxation or MD run stops here, not on a meaningless number
            raise StructureError(f"{type(self).__name__}: refused structure: {reason}")
        batch = self.predictor.batch([self.atoms])
        # stress costs one more gradient input, so it comes with every periodic result and a
        # cell filter asking for forces, then stress, runs the model once
        periodic = bool(self.atoms.pbc.all())
        out = self.predictor.model.potential(batch, self.task, stress=periodic)
        self.results["energy"] = self.results["free_energy"] = out["value"].sum().item()
        self.results["forces"] = out["forces"].cpu().numpy().astype(np.float64)
        if periodic:
            self.results["stress"] = out[K.STRESS][0].cpu().numpy().astype(np.float64)
