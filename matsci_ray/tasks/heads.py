"""Output heads: one per task, each owning its normalisation buffers.

Heads predict in physical units; the statistics they need (mean/std, per-element reference
energies, force scale) come from the ingest manifest's train split and are stored as buffers, so
a checkpoint predicts in eV with nothing else loaded. Losses divide by the target's scale, which
puts tasks of different units on a comparable footing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from matsci_ray.models.base import EncoderOutput
from matsci_ray.models.blocks import mlp
from matsci_ray.tasks.registry import ForceLoss, TaskSpec

NUM_Z = 119


def target_mask(batch: Any, target: str, num_graphs: int) -> Tensor:
    """Graphs that carry ``target`` and belong to the task's data set."""
    mask = getattr(batch, f"{target}_mask", None)
    if mask is None:
        return torch.ones(num_graphs, dtype=torch.bool, device=batch.pos.device)
    return mask


class Head(nn.Module):
    """Base: ``forward`` gives the prediction, ``loss`` a scale-free training loss."""

    def __init__(self, task: TaskSpec) -> None:
        super().__init__()
        self.task = task

    def fit_normalisation(self, split_summary: dict[str, Any]) -> None:
        """Set buffers from the manifest's train-split summary (``manifest['splits']['train']``)."""

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()


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

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return ((pred - target) / self.std).pow(2).mean()


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

    @property
    def energy_target(self) -> str:
        return "energy" if self.task.kind == "forces" else self.task.target

    def fit_normalisation(self, split_summary: dict[str, Any]) -> None:
        fit = split_summary["reference_energies"].get(self.energy_target)
        if fit is None:  # a manifest from before per-atom-energy fits: the mean, unit scale
            stats = split_summary["targets"][self.energy_target]
            self.reference.fill_(stats["mean"])
            self.scale.fill_(max(stats["std"], 1e-6))
            return
        self.reference.copy_(reference_table(fit))
        # residual_rms is per structure: per atom, a sum of N independent errors grows as √N
        mean_atoms = split_summary["atoms_per_record"]["mean"] if self.task.extensive else 1.0
        self.scale.fill_(max(fit["residual_rms"] / mean_atoms**0.5, 1e-3))
        forces = split_summary["targets"].get("forces")
        if forces is not None:
            rms = (forces["std"] ** 2 + forces["mean"] ** 2) ** 0.5
            self.force_scale.fill_(max(rms, 1e-3))
            if self.task.kind == "forces":
                self.scale.fill_(max(rms, 1e-3))  # per-atom energies on the force scale

    def forward(self, out: EncoderOutput, batch: Any) -> Tensor:
        per_atom = self.reference[batch.z] + self.scale * self.net(out.node).squeeze(-1)
        reduce = "sum" if self.task.extensive else "mean"
        return scatter(per_atom, batch.batch, dim=0, dim_size=batch.num_graphs, reduce=reduce)

    def loss(self, pred: Tensor, target: Tensor, natoms: Tensor) -> Tensor:
        """Squared error per atom in units of ``scale`` (already per atom when intensive)."""
        per_atom = natoms if self.task.extensive else torch.ones_like(natoms)
        return ((pred - target) / (per_atom * self.scale)).pow(2).mean()

    def force_loss(self, pred: Tensor, target: Tensor, kind: ForceLoss = "mse") -> Tensor:
        """``mse``: mean squared component error; ``l2mae``: mean per-atom error norm (both in
        units of ``force_scale``)."""
        err = (pred - target) / self.force_scale
        if kind == "l2mae":  # the epsilon keeps the norm's (double) backward finite at zero
            return err.pow(2).sum(-1).add(1e-12).sqrt().mean()
        return err.pow(2).mean()


class ClassHead(Head):
    """Logits from the structure embedding: one for binary tasks, ``num_classes`` otherwise."""

    def __init__(self, task: TaskSpec, graph_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__(task)
        self.num_classes = num_classes
        self.net = mlp([graph_dim, hidden, hidden, 1 if task.kind == "binary" else num_classes])

    def forward(self, out: EncoderOutput, batch: Any) -> Tensor:
        logits = self.net(out.graph)
        return logits.squeeze(-1) if self.task.kind == "binary" else logits

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.task.kind == "binary":
            return nn.functional.binary_cross_entropy_with_logits(logits, target.float())
        return nn.functional.cross_entropy(logits, target.long())

    def predict_class(self, logits: Tensor) -> Tensor:
        return (logits > 0).long() if self.task.kind == "binary" else logits.argmax(-1)


def build_head(task: TaskSpec, node_dim: int, graph_dim: int, hidden: int) -> Head:
    if task.kind in ("binary", "multiclass"):
        return ClassHead(task, graph_dim, hidden, num_classes=230)
    if task.readout in ("sum", "mean"):
        return EnergyHead(task, node_dim, hidden)
    return ScalarHead(task, graph_dim, hidden)
