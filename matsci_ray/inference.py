"""Predicting with a checkpoint outside training: on ASE ``Atoms`` and as an ASE calculator.

The same graph transform and collation as training are used, so a structure is seen by the
model exactly as it was during training.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from matsci_ray import keys as K
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.heads import ClassHead
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


class Predictor:
    """A checkpoint ready to predict every task it was trained on, in physical units."""

    def __init__(self, checkpoint: Path | str, device: str = "cpu") -> None:
        model, config, _ = load_model(checkpoint)
        self.model: MatSciModel = model.to(device)
        self.config = config
        self.device = device
        self.transform = RadiusGraphTransform(config.data.cutoff, config.data.max_neighbors)

    def predict(self, structures: Sequence[Atoms], forces: bool = True) -> list[dict[str, Any]]:
        rows = self.transform(atoms_to_columns(structures))
        batch = rows_to_pyg_batch(rows, []).to(self.device)
        with torch.set_grad_enabled(forces and self.model.needs_forces):
            preds = self.model(batch, forces=forces and self.model.needs_forces)
        results: list[dict[str, Any]] = [{} for _ in structures]
        ptr = batch.ptr.tolist()
        for name, out in preds.items():
            head = self.model.head(name)
            value = out["value"].detach()
            if isinstance(head, ClassHead):
                value = head.predict_class(value)
                if head.task.kind == "multiclass":
                    value = value + 1  # space groups are numbered from 1
            for k, result in enumerate(results):
                result[name] = value[k].item()
                if "forces" in out:
                    result[f"{name}:forces"] = out["forces"][ptr[k] : ptr[k + 1]].detach().numpy()
        return results

    def predict_batches(
        self, structures: Iterable[Atoms], batch_size: int = 32
    ) -> Iterator[dict[str, Any]]:
        chunk: list[Atoms] = []
        for atoms in structures:
            chunk.append(atoms)
            if len(chunk) == batch_size:
                yield from self.predict(chunk)
                chunk = []
        if chunk:
            yield from self.predict(chunk)


class MatSciCalculator(Calculator):
    """ASE calculator: energy and conservative forces from a checkpoint's energy task.

    ``task`` picks the head (default: the first force task, else the first energy task), so a
    trained model can drive ``ase.optimize`` or molecular dynamics.
    """

    implemented_properties = ["energy", "forces", "free_energy"]  # noqa: RUF012

    def __init__(
        self, checkpoint: Path | str, task: str | None = None, device: str = "cpu", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.predictor = Predictor(checkpoint, device)
        tasks = self.predictor.model.tasks
        energy_tasks = [n for n, t in tasks.items() if t.extensive]
        if task is None:
            forces = [n for n in energy_tasks if tasks[n].kind == "forces"]
            task = (forces or energy_tasks or [None])[0]
        if task not in energy_tasks:
            raise ValueError(f"checkpoint has no energy task {task!r} (has: {energy_tasks})")
        self.task = task

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        result = self.predictor.predict([self.atoms], forces=True)[0]
        self.results["energy"] = self.results["free_energy"] = float(result[self.task])
        forces = result.get(f"{self.task}:forces")
        if forces is None:  # an energy-only task: still conservative forces by autograd
            forces = self._autograd_forces()
        self.results["forces"] = np.asarray(forces, dtype=np.float64)

    def _autograd_forces(self) -> np.ndarray:
        p = self.predictor
        rows = p.transform(atoms_to_columns([self.atoms]))
        batch = rows_to_pyg_batch(rows, []).to(p.device)
        batch.pos.requires_grad_(True)
        energy = p.model(batch, forces=False)[self.task]["value"].sum()
        (grad,) = torch.autograd.grad(energy, batch.pos)
        return -grad.numpy()
