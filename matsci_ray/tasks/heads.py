"""Output heads: one per task, each owning its normalisation buffers, its loss and its metrics.

Heads predict in physical units; the statistics they need (mean/std, per-element reference
energies, force scale) come from the ingest manifest's train split and are stored as buffers, so
a checkpoint predicts in eV with nothing else loaded. Losses divide by the target's scale, which
puts tasks of different units on a comparable footing.

Every head answers the same two questions about the structures a batch holds for its task
(``mask``): :meth:`Head.loss` and :meth:`Head.metric_sums`. Training, evaluation and reports
loop over heads without knowing their kinds; a new kind of task is a new head and a line in
:func:`build_head`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from matsci_ray.keys import FIXED, FORCES, GPA, STRESS
from matsci_ray.models.base import EncoderOutput
from matsci_ray.models.blocks import mlp
from matsci_ray.tasks.registry import ForceLoss, TaskSpec

if TYPE_CHECKING:
    from matsci_ray.config import LossConfig

NUM_Z = 119
# A force head's stress scale (eV/Å³) until a data set's stress RMS is fitted: 1 GPa, the
# order of the stresses of near-equilibrium DFT frames.
DEFAULT_STRESS_SCALE = GPA

# One task's predictions: ``"value"`` (B,) or logits, plus ``"forces"`` (N, 3) for force tasks
# and, where computed, their ``"stress"`` (B, 6).
TaskPredictions = dict[str, Tensor]
# Per metric name, ``(sum, count)``: a metric over an epoch is its sums' total over its counts'.
SumsAndCounts = dict[str, tuple[Tensor, int]]


def target_mask(batch: Any, target: str, num_graphs: int) -> Tensor:
    """Graphs that carry ``target`` (all of them where the batch has no mask for it)."""
    mask = getattr(batch, f"{target}_mask", None)
    if mask is None:
        return torch.ones(num_graphs, dtype=torch.bool, device=batch.pos.device)
    return mask


class Head(nn.Module, ABC):
    """One task's output: ``forward`` gives the prediction in physical units; :meth:`loss` and
    :meth:`metric_sums` score it on the structures of a batch that carry the task's target.

    ``mask`` (B,) selects those structures (at least one, for :meth:`loss`): they carry
    ``task.value_target`` and come from the task's data set (``MatSciModel.mask``)."""

    def __init__(self, task: TaskSpec) -> None:
        super().__init__()
        self.task = task

    def fit_normalisation(self, split_summary: dict[str, Any]) -> None:
        """Set buffers from the manifest's train-split summary (``manifest['splits']['train']``)."""

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def predict(self, value: Tensor) -> Tensor:
        """What the head predicts, from its ``"value"`` output: the value itself, or a class."""
        return value

    def scored(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(predicted value, target)`` of the structures in ``mask``."""
        return pred["value"][mask], batch[self.task.value_target][mask]

    @abstractmethod
    def loss(self, pred: TaskPredictions, batch: Any, mask: Tensor, config: LossConfig) -> Tensor:
        """Scale-free training loss (a scalar) on the structures in ``mask``."""

    @abstractmethod
    def metric_sums(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> SumsAndCounts:
        """Per metric name (``mse``, ``accuracy``, ...), its ``(sum, count)`` over ``mask``;
        ``task.metric`` is always one of them (the key reports and dashboards read)."""


def regression_sums(value: Tensor, target: Tensor) -> SumsAndCounts:
    """Squared and absolute errors of a regression."""
    error = value - target
    return {"mse": (error.pow(2).sum(), len(target)), "mae": (error.abs().sum(), len(target))}


class ScalarHead(Head):
    """Intensive scalar from the structure embedding: ``mean + std · MLP(graph)``."""

    def __init__(self, task: TaskSpec, graph_dim: int, hidden: int) -> None:
        super().__init__(task)
        self.net = mlp([graph_dim, hidden, hidden, 1])
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    def fit_normalisation(self, split_summary: dict[str, Any]) -> None:
        stats = split_summary["targets"][self.task.target]
        self.mean.fill_(stats["mean"])
        self.std.fill_(max(stats["std"], 1e-6))

    def forward(self, out: EncoderOutput, batch: Any) -> Tensor:
        return self.mean + self.std * self.net(out.graph).squeeze(-1)

    def loss(self, pred: TaskPredictions, batch: Any, mask: Tensor, config: LossConfig) -> Tensor:
        value, target = self.scored(pred, batch, mask)
        return ((value - target) / self.std).pow(2).mean()

    def metric_sums(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> SumsAndCounts:
        return regression_sums(*self.scored(pred, batch, mask))


def reference_table(fit: dict[str, Any]) -> Tensor:
    """Reference energy per atomic number from a manifest's ``reference_energies`` entry.

    An element absent from training (OC20: 4 of the sample's validation elements) gets the
    mean per-atom energy, not zero (off by ~5 eV per atom for total energies).
    """
    table = torch.full((NUM_Z,), float(fit.get("mean_per_atom", 0.0)))
    for z, e in fit["per_element"].items():
        table[int(z)] = e
    return table


class EnergyHead(Head):
    """Energy from atoms: ``Σ_i (e_Z(i) + scale · MLP(h_i))`` with fitted reference energies,
    or the mean over atoms for energies per atom (``task.readout == "mean"``)."""

    def __init__(self, task: TaskSpec, node_dim: int, hidden: int) -> None:
        super().__init__(task)
        self.net = mlp([node_dim, hidden, hidden, 1])
        self.register_buffer("reference", torch.zeros(NUM_Z))
        self.register_buffer("scale", torch.ones(()))  # eV per atom
        self.register_buffer("force_scale", torch.ones(()))  # eV/Å

    def fit_normalisation(self, split_summary: dict[str, Any]) -> None:
        target = self.task.value_target
        fit = split_summary["reference_energies"].get(target)
        if fit is None:  # a manifest from before per-atom-energy fits: the mean, unit scale
            stats = split_summary["targets"][target]
            self.reference.fill_(stats["mean"])
            self.scale.fill_(max(stats["std"], 1e-6))
            return
        self.reference.copy_(reference_table(fit))
        # residual_rms is per structure: per atom, a sum of N independent errors grows as √N
        mean_atoms = split_summary["atoms_per_record"]["mean"] if self.task.extensive else 1.0
        self.scale.fill_(max(fit["residual_rms"] / mean_atoms**0.5, 1e-3))
        forces = split_summary["targets"].get("forces")
        if forces is not None:
            self.fit_force_scale((forces["std"] ** 2 + forces["mean"] ** 2) ** 0.5)

    def fit_force_scale(self, rms: float) -> None:
        """The data set's force RMS (eV/Å), where it has forces."""
        self.force_scale.fill_(max(rms, 1e-3))

    def forward(self, out: EncoderOutput, batch: Any) -> Tensor:
        per_atom = self.reference[batch.z] + self.scale * self.net(out.node).squeeze(-1)
        reduce = "sum" if self.task.extensive else "mean"
        return scatter(per_atom, batch.batch, dim=0, dim_size=batch.num_graphs, reduce=reduce)

    def loss(self, pred: TaskPredictions, batch: Any, mask: Tensor, config: LossConfig) -> Tensor:
        value, target = self.scored(pred, batch, mask)
        return self.energy_loss(value, target, batch.natoms[mask].to(value.dtype))

    def energy_loss(self, pred: Tensor, target: Tensor, natoms: Tensor) -> Tensor:
        """Squared error per atom in units of ``scale`` (already per atom when intensive)."""
        per_atom = natoms if self.task.extensive else torch.ones_like(natoms)
        return ((pred - target) / (per_atom * self.scale)).pow(2).mean()

    def metric_sums(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> SumsAndCounts:
        return regression_sums(*self.scored(pred, batch, mask))


class ForceHead(EnergyHead):
    """A force task's energy head: forces are ``−∂E/∂r`` of its energy and stress its strain
    derivative (``MatSciModel``); it learns and scores all three, forces on
    :meth:`scored_atoms`, stress on the structures that carry one."""

    def __init__(self, task: TaskSpec, node_dim: int, hidden: int) -> None:
        super().__init__(task, node_dim, hidden)
        self.register_buffer("stress_scale", torch.full((), DEFAULT_STRESS_SCALE))  # eV/Å³

    def fit_normalisation(self, split_summary: dict[str, Any]) -> None:
        super().fit_normalisation(split_summary)
        stress = split_summary["targets"].get(STRESS)
        if stress is not None and stress.get("count"):
            rms = (stress["std"] ** 2 + stress["mean"] ** 2) ** 0.5
            self.stress_scale.fill_(max(rms, 1e-4))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A checkpoint from before stress has no stress_scale: keep the default, which no
        # loss of that checkpoint's training ever read. load_state_dict passes a copy.
        state_dict.setdefault(f"{prefix}stress_scale", self.stress_scale.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit_force_scale(self, rms: float) -> None:
        super().fit_force_scale(rms)
        self.scale.fill_(max(rms, 1e-3))  # per-atom energies on the force scale

    def stressed(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> Tensor | None:
        """Structures in ``mask`` with a stress label and a predicted stress, or ``None``."""
        labelled = getattr(batch, f"{STRESS}_mask", None)
        if STRESS not in pred or labelled is None:
            return None
        rows = mask & labelled
        return rows if bool(rows.any()) else None

    def scored_atoms(self, batch: Any, mask: Tensor) -> Tensor:
        """Atoms whose forces the task learns and scores: those of the structures in ``mask``,
        less atoms held fixed where the task follows OC20's free-atom rule."""
        atoms = mask[batch.batch]
        fixed = getattr(batch, FIXED, None)
        if self.task.free_atoms_only and fixed is not None:
            atoms = atoms & ~fixed
        return atoms

    def loss(self, pred: TaskPredictions, batch: Any, mask: Tensor, config: LossConfig) -> Tensor:
        """The energy's loss at ``config.energy_weight`` plus the forces' at their weight (the
        experiment's, else the task's)."""
        energy = super().loss(pred, batch, mask, config)
        atoms = self.scored_atoms(batch, mask)
        kind = config.force_loss or self.task.force_loss
        forces = self.force_loss(pred["forces"][atoms], batch[FORCES][atoms], kind)
        weight = self.task.force_weight if config.force_weight is None else config.force_weight
        total = config.energy_weight * energy + weight * forces
        rows = self.stressed(pred, batch, mask) if config.stress_weight > 0 else None
        if rows is None:
            return total
        error = (pred[STRESS][rows] - batch[STRESS][rows]) / self.stress_scale
        return total + config.stress_weight * error.pow(2).mean()

    def force_loss(self, pred: Tensor, target: Tensor, kind: ForceLoss = "mse") -> Tensor:
        """``mse``: mean squared component error; ``l2mae``: mean per-atom error norm (both in
        units of ``force_scale``)."""
        err = (pred - target) / self.force_scale
        if kind == "l2mae":  # the epsilon keeps the norm's (double) backward finite at zero
            return err.pow(2).sum(-1).add(1e-12).sqrt().mean()
        return err.pow(2).mean()

    def metric_sums(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> SumsAndCounts:
        """Force MAE on the scored atoms, and on every atom where those are the free ones
        (comparable with other force sets); the energy's MSE."""
        value, target = self.scored(pred, batch, mask)
        sums = {"energy_mse": ((value - target).pow(2).sum(), len(target))}
        error = (pred["forces"] - batch[FORCES]).abs()
        atoms = self.scored_atoms(batch, mask)
        sums["mae"] = (error[atoms].sum(), error[atoms].numel())
        if self.task.free_atoms_only:
            every = mask[batch.batch]
            sums["mae_all_atoms"] = (error[every].sum(), error[every].numel())
        rows = self.stressed(pred, batch, mask)
        if rows is not None:  # eV/Å³, over the six Voigt components
            stress_error = (pred[STRESS][rows] - batch[STRESS][rows]).abs()
            sums["stress_mae"] = (stress_error.sum(), stress_error.numel())
        return sums


class ClassHead(Head):
    """Logits from the structure embedding: one for binary tasks, ``num_classes`` otherwise."""

    def __init__(self, task: TaskSpec, graph_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__(task)
        self.num_classes = num_classes
        self.net = mlp([graph_dim, hidden, hidden, 1 if task.kind == "binary" else num_classes])

    def forward(self, out: EncoderOutput, batch: Any) -> Tensor:
        logits = self.net(out.graph)
        return logits.squeeze(-1) if self.task.kind == "binary" else logits

    def loss(self, pred: TaskPredictions, batch: Any, mask: Tensor, config: LossConfig) -> Tensor:
        logits, target = self.scored(pred, batch, mask)
        if self.task.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(logits, target.float())
        return nn.functional.cross_entropy(logits, target.long())

    def metric_sums(self, pred: TaskPredictions, batch: Any, mask: Tensor) -> SumsAndCounts:
        logits, target = self.scored(pred, batch, mask)
        correct = (self.predict(logits) == target.long()).sum()
        return {"accuracy": (correct, len(target))}

    def predict(self, logits: Tensor) -> Tensor:
        """The class index (from 0; a multiclass target numbered from its ``low`` is offset)."""
        return (logits > 0).long() if self.task.kind == "binary" else logits.argmax(-1)


def build_head(task: TaskSpec, node_dim: int, graph_dim: int, hidden: int) -> Head:
    """The head of ``task``'s kind; checkpoints hold its parameters and buffers by name, so a
    head's attributes are part of the checkpoint format."""
    if task.kind in ("binary", "multiclass"):
        return ClassHead(task, graph_dim, hidden, num_classes=230)
    if task.kind == "forces":
        return ForceHead(task, node_dim, hidden)
    if task.readout in ("sum", "mean"):
        return EnergyHead(task, node_dim, hidden)
    return ScalarHead(task, graph_dim, hidden)
