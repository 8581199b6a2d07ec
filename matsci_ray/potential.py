"""``MatSciModel``: a shared encoder with one head per task, forces and stress by autograd.

Forces are always the negative gradient of a head's energy with respect to positions
(conservative), and stress its strain derivative over the volume, ``σ = (1/V) ∂E/∂ε`` (ASE's
sign and Voigt order), so any encoder becomes a force field without force-specific code: a
zero strain is applied to positions and cell before the encoder computes edge vectors, and
autograd differentiates the energy with respect to it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from matsci_ray.graphs.geometry import apply_strain, voigt
from matsci_ray.keys import STRESS
from matsci_ray.models import build_encoder
from matsci_ray.models.base import Encoder
from matsci_ray.tasks.heads import Head, TaskPredictions, build_head, target_mask
from matsci_ray.tasks.registry import TASKS, TaskSpec

if TYPE_CHECKING:
    from matsci_ray.config import ExperimentConfig

Predictions = dict[str, TaskPredictions]  # per task


def carries_stress(batch: Any) -> bool:
    """Whether some structure of ``batch`` has a stress label (collation's ``stress_mask``)."""
    mask = getattr(batch, f"{STRESS}_mask", None)
    return mask is not None and bool(mask.any())


def strained(batch: Any) -> tuple[Any, Tensor]:
    """A shallow copy of ``batch`` whose positions and cell carry a zero strain, and that
    strain's ``(B, 3, 3)`` displacement, for autograd to differentiate the energy by."""
    displacement = torch.zeros(
        (batch.num_graphs, 3, 3), dtype=batch.pos.dtype, device=batch.pos.device
    ).requires_grad_(True)
    out = copy.copy(batch)  # the caller's batch keeps its own positions and cell
    out.pos, out.cell = apply_strain(batch.pos, batch.cell, batch.batch, displacement)
    return out, displacement


def energy_derivatives(
    energy: Tensor,
    pos: Tensor,
    cell: Tensor,
    displacement: Tensor | None,
    create_graph: bool = False,
) -> TaskPredictions:
    """``"forces"`` ``−∂E/∂pos`` (N, 3), and with a ``displacement`` (:func:`strained`)
    ``"stress"`` (B, 6) eV/Å³; NaN for a structure without volume (no periodic cell)."""
    inputs = [pos] if displacement is None else [pos, displacement]
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, retain_graph=True)
    out = {"forces": -grads[0]}
    if displacement is not None:
        volume = torch.linalg.det(cell.detach()).abs()
        has_volume = volume > 1e-6
        # dividing by a safe volume keeps NaN out of the backward of the structures that count
        per_volume = voigt(grads[1]) / torch.where(has_volume, volume, 1.0)[:, None]
        out[STRESS] = torch.where(has_volume[:, None], per_volume, torch.nan)
    return out


def callers_autocast(device: str) -> torch.autocast:
    """The autocast the caller has on (bf16 training), or a disabled one, to re-enter for the
    encoder alone from inside a region that turns it off."""
    enabled = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if enabled else None
    return torch.autocast(device, dtype=dtype, enabled=enabled)


class MatSciModel(nn.Module):
    def __init__(self, encoder: Encoder, tasks: list[TaskSpec], head_hidden: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.tasks = {t.name: t for t in tasks}
        self.datasets = list(dict.fromkeys(t.dataset for t in tasks))
        # DDP expects every parameter in every step: when every head reads atoms (energies),
        # the encoder's structure readout (MEGNet's Set2Set) must join the graph as an exact zero
        self._graph_unread = all(t.readout != "graph" for t in tasks)
        self.heads = nn.ModuleDict(
            {t.name: build_head(t, encoder.node_dim, encoder.graph_dim, head_hidden) for t in tasks}
        )

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> MatSciModel:
        """The untrained model of an experiment: its encoder and one head per task."""
        encoder = build_encoder(config.model.name, config.data.cutoff, config.model.params)
        return cls(encoder, [TASKS[t] for t in config.tasks], config.model.head_hidden)

    @property
    def needs_forces(self) -> bool:
        return any(t.kind == "forces" for t in self.tasks.values())

    def fit_normalisation(self, summaries: dict[str, dict[str, Any]]) -> None:
        """``summaries``: data set name → its manifest's train-split summary."""
        for name, head in self.heads.items():
            head.fit_normalisation(summaries[self.tasks[name].dataset])

    def mask(self, batch: Any, name: str) -> Tensor:
        """Structures task ``name`` scores: they carry its ``value_target`` and come from its
        data set (``batch.dataset_index``, set by training collation; absent at inference)."""
        task = self.tasks[name]
        mask = target_mask(batch, task.value_target, batch.num_graphs)
        index = getattr(batch, "dataset_index", None)
        if index is not None and len(self.datasets) > 1:
            mask = mask & (index == self.datasets.index(task.dataset))
        return mask

    def head(self, name: str) -> Head:
        return self.heads[name]  # type: ignore[return-value]

    def forward(
        self, batch: Any, forces: bool | None = None, stress: bool | None = None
    ) -> Predictions:
        """Per task: ``{"value": (B,) or logits}``, plus ``"forces"`` (N, 3) for force tasks
        and their ``"stress"`` (B, 6) when ``stress`` (default: when the batch carries stress
        labels; stress implies forces)."""
        want_forces = self.needs_forces if forces is None else forces
        want_stress = want_forces and (carries_stress(batch) if stress is None else stress)
        device = batch.pos.device.type
        encoder_autocast = callers_autocast(device)
        # Under a bf16 autocast (run.precision) only the encoder's forward is in bf16. The
        # strain, the heads and each structure's energy sum stay in fp32, as do the positions
        # and edge vectors (graphs.geometry): forces and stress are derivatives of the energy
        # by positions and strain, taken twice in training (create_graph), and bf16's 8-bit
        # mantissa would round a slab's summed energy (hundreds of eV) to about 1 eV and a
        # 10 Å lattice vector by 0.02 Å before anything is differentiated.
        with torch.autocast(device, enabled=False):
            pos, cell = batch.pos, batch.cell
            if want_forces and not pos.requires_grad:
                pos.requires_grad_(True)
            displacement = None
            if want_stress:
                batch, displacement = strained(batch)
            with encoder_autocast:
                out = self.encoder(batch)
            out = out._replace(node=out.node.to(pos.dtype), graph=out.graph.to(pos.dtype))
            if self._graph_unread:
                out = out._replace(node=out.node + 0.0 * out.graph.sum())
            preds: Predictions = {}
            for name, head in self.heads.items():
                value = head(out, batch)
                preds[name] = {"value": value}
                if want_forces and self.tasks[name].kind == "forces":
                    preds[name].update(
                        energy_derivatives(value, pos, cell, displacement, self.training)
                    )
        return preds

    def potential(self, batch: Any, task: str, stress: bool = True) -> TaskPredictions:
        """Energy ``"value"`` of ``task``'s head (any total-energy task), its ``"forces"`` and,
        with ``stress``, its ``"stress"``: what an ASE calculator returns."""
        pos, cell = batch.pos, batch.cell
        with torch.enable_grad():
            pos.requires_grad_(True)
            displacement = None
            if stress:
                batch, displacement = strained(batch)
            energy = self.head(task)(self.encoder(batch), batch)
            derivatives = energy_derivatives(energy, pos, cell, displacement)
        return {"value": energy.detach(), **{k: v.detach() for k, v in derivatives.items()}}
