"""One registry of the benchmark's tasks: the rows of the MatSciML paper's Table 1.

Each row names its data set (as ingested), its target column, how it is learned and how it is
scored. Targets are typed here once, never guessed per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from matsci_ray import keys as K

TaskKind = Literal["regression", "forces", "binary", "multiclass"]
Readout = Literal["sum", "mean", "graph"]
Metric = Literal["mse", "mae", "accuracy"]
ForceLoss = Literal["mse", "l2mae"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    target: str
    kind: TaskKind
    metric: Metric
    unit: str
    description: str
    # OC20's convention (OCP's train_on_free_atoms / eval_on_free_atoms): forces are learned
    # and scored on the atoms the relaxation moves; fixed subsurface atoms keep the large
    # residual forces of a slab cut from bulk, which no relaxation was asked to remove.
    free_atoms_only: bool = False
    # How force tasks learn their forces, unless an experiment's loss section says otherwise:
    # squared component errors, or OCP's L2MAE (mean norm of each atom's error). OC20's
    # relaxation forces are heavy-tailed (a few early frames reach 90 eV/Å); under squared
    # errors those frames drive the steps and the model stays at zero forces, under L2MAE
    # each atom's pull is bounded. Weights relative to the energy term's 1.
    force_loss: ForceLoss = "mse"
    force_weight: float = 10.0

    @property
    def extensive(self) -> bool:
        """Predicted as a sum over atoms plus per-element reference energies."""
        return self.kind == "forces" or K.TARGETS[self.target].extensive

    @property
    def columns(self) -> list[str]:
        """The target columns a batch must carry for this task."""
        if self.kind != "forces":
            return [self.target]
        return [K.ENERGY, K.FORCES] + ([K.FIXED] if self.free_atoms_only else [])

    @property
    def value_target(self) -> str:
        """The per-structure column the task's ``value`` prediction is compared with, and
        whose presence selects the structures it scores: the energy for force tasks."""
        return K.ENERGY if self.kind == "forces" else self.target

    @property
    def readout(self) -> Readout:
        """How the prediction is read out: atoms' energies summed (total energies) or averaged
        (energies per atom), or from the structure embedding (everything else)."""
        if self.extensive:
            return "sum"
        return "mean" if K.TARGETS[self.target].per_atom_energy else "graph"

    @property
    def metric_name(self) -> str:
        return f"{self.name}/{self.metric}"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def _row(
    name: str,
    dataset: str,
    target: str,
    kind: TaskKind,
    metric: Metric,
    doc: str,
    free_atoms_only: bool = False,
    force_loss: ForceLoss = "mse",
    force_weight: float = 10.0,
) -> TaskSpec:
    unit = K.TARGETS[target].unit
    if metric == "mse" and unit:
        unit = f"({unit})²"
    return TaskSpec(
        name, dataset, target, kind, metric, unit, doc, free_atoms_only, force_loss, force_weight
    )


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _row("s2ef-energy", "oc20-s2ef", K.ENERGY, "regression", "mse", "OC20 S2EF total energy"),
        _row(
            "s2ef-forces",
            "oc20-s2ef",
            K.FORCES,
            "forces",
            "mae",
            "OC20 S2EF forces, −∂E/∂r, on free atoms",
            free_atoms_only=True,
            # OCP's S2EF loss: L2MAE forces at 100 to the energy's 1
            force_loss="l2mae",
            force_weight=100.0,
        ),
        _row(
            "is2re",
            "oc20-is2re",
            K.RELAXED_ENERGY,
            "regression",
            "mse",
            "OC20 IS2RE: relaxed energy from the initial structure",
        ),
        _row(
            "mp-formation-energy",
            "materials-project",
            K.FORMATION_ENERGY,
            "regression",
            "mse",
            "Materials Project formation energy per atom",
        ),
        _row("lips-energy", "lips", K.ENERGY, "regression", "mse", "LiPS total energy"),
        _row(
            "oqmd-formation-energy",
            "oqmd",
            K.FORMATION_ENERGY,
            "regression",
            "mse",
            "OQMD formation energy per atom",
        ),
        _row(
            "nomad-energy",
            "nomad",
            K.ENERGY,
            "regression",
            "mse",
            "NOMAD total energy (NOMAD entries carry no formation energy)",
        ),
        _row(
            "cmd-formation-energy",
            "carolina-db",
            K.FORMATION_ENERGY,
            "regression",
            "mse",
            "Carolina Materials Database formation energy per atom",
        ),
        _row("lips-forces", "lips", K.FORCES, "forces", "mae", "LiPS forces, −∂E/∂r"),
        _row(
            "mp-band-gap",
            "materials-project",
            K.BAND_GAP,
            "regression",
            "mse",
            "Materials Project band gap",
        ),
        _row(
            "mp-fermi-energy",
            "materials-project",
            K.EFERMI,
            "regression",
            "mse",
            "Materials Project Fermi energy",
        ),
        _row(
            "mp-stability",
            "materials-project",
            K.IS_STABLE,
            "binary",
            "accuracy",
            "Materials Project: on the convex hull",
        ),
        _row(
            "mp-space-group",
            "materials-project",
            K.SPACE_GROUP,
            "multiclass",
            "accuracy",
            "Materials Project space group (230 classes)",
        ),
        _row(
            "carbon24-energy",
            "carbon-24",
            K.ENERGY,
            "regression",
            "mse",
            "Carbon-24 total DFT energy (the CSV's energy per atom times the atom count)",
        ),
        _row(
            "perov5-formation-energy",
            "perov-5",
            K.FORMATION_ENERGY,
            "regression",
            "mse",
            "Perov-5 heat of formation per atom (heat_ref, eV per 5-atom cell, over 5)",
        ),
        _row(
            "mp20-formation-energy",
            "mp-20",
            K.FORMATION_ENERGY,
            "regression",
            "mse",
            "MP-20 formation energy per atom",
        ),
        _row(
            "omat24-forces",
            "omat24",
            K.FORCES,
            "forces",
            "mae",
            "OMat24 (fairchem ASE-LMDB) total energy and forces, −∂E/∂r",
        ),
        _row(
            "mptrj-forces",
            "mptrj",
            K.FORCES,
            "forces",
            "mae",
            "MPtrj MP2020-corrected total energy and forces, −∂E/∂r",
        ),
    )
}


def metric_key(task: str) -> str:
    """Where ``task``'s validation metric is reported (history, reports, dashboards)."""
    return f"val/{TASKS[task].metric_name}"


def primary_metric(tasks: Sequence[str]) -> tuple[str, bool]:
    """``(metric key, higher is better)`` of a run's first task: the one score that early
    stopping, plateau cuts, the best checkpoint and studies follow."""
    return metric_key(tasks[0]), TASKS[tasks[0]].higher_is_better


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    return TASKS[name]
