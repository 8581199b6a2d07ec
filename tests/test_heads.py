"""Every task's head answers the one interface training, evaluation and reports use: a loss that
is a finite scalar with a gradient, and metric sums under the keys the reports and dashboards
read. Parametrised over the task registry, so a new task is tested by being registered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ase.io
import pytest
import torch

from matsci_ray import keys as K
from matsci_ray.config import LossConfig
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.inference import atoms_to_columns
from matsci_ray.models import build_encoder
from matsci_ray.potential import MatSciModel
from matsci_ray.tasks.heads import Head
from matsci_ray.tasks.registry import TASKS, metric_key, primary_metric
from matsci_ray.train.metrics import MetricSums, task_losses
from tests.samples import SAMPLES

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "grafana"
CUTOFF = 4.0
PRESENT = [True, True, False]  # the third structure lacks every target


def _batch() -> object:
    """Three OC20 structures (fixed atoms included) with a random value of every target."""
    trajectories = SAMPLES / "oc20" / "trajectories"
    frames = [ase.io.read(trajectories / name, 0) for name in ("random1000100.traj",) * 2]
    frames.append(ase.io.read(trajectories / "random1000102.traj", 0))
    batch = rows_to_pyg_batch(RadiusGraphTransform(CUTOFF)(atoms_to_columns(frames)), [])
    generator = torch.Generator().manual_seed(0)
    graphs, atoms = batch.num_graphs, len(batch.z)
    values = {
        "scalar": lambda: torch.randn(graphs, generator=generator),
        "bool": lambda: torch.tensor([1.0, 0.0, 1.0]),
        "class": lambda: torch.randint(0, 230, (graphs,), generator=generator),
        "per_atom_vector": lambda: torch.randn(atoms, 3, generator=generator),
        "per_atom_bool": lambda: torch.rand(atoms, generator=generator) > 0.7,
        "per_atom_int": lambda: torch.zeros(atoms, dtype=torch.long),
        "voigt": lambda: torch.randn(graphs, 6, generator=generator),
    }
    for name, spec in K.TARGETS.items():
        batch[name] = values[spec.kind]()
        batch[f"{name}_mask"] = torch.tensor(PRESENT)
    return batch


def _model(task: str) -> MatSciModel:
    torch.manual_seed(0)
    encoder = build_encoder("egnn", CUTOFF, {"hidden_dim": 8, "num_layers": 1, "num_rbf": 4})
    return MatSciModel(encoder, [TASKS[task]], head_hidden=8).train()


def _absent_changed(batch: object, columns: list[str]) -> object:
    """``batch`` with other values for the structure that carries no target."""
    changed = batch.clone()
    absent = ~torch.tensor(PRESENT)
    for column in columns:
        rows = (
            absent if K.TARGETS[column].kind in ("scalar", "bool", "class") else absent[batch.batch]
        )
        values = changed[column].clone()
        values[rows] = (~values[rows]) if values.dtype == torch.bool else values[rows] + 7
        changed[column] = values
    return changed


def _validation_panels() -> list[tuple[str, str]]:
    """``(panel title, name=~ pattern)`` of every dashboard panel of validation metrics."""
    panels = []
    for path in DASHBOARD.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                for pattern in re.findall(r'name=~"(val/[^"]*)"', target["expr"]):
                    panels.append((panel["title"], pattern))
    return panels


@pytest.mark.parametrize("task", list(TASKS))
def test_head_loss_is_a_finite_scalar_with_gradient(task: str) -> None:
    model, batch = _model(task), _batch()
    head = model.head(task)
    assert isinstance(head, Head)
    mask = model.mask(batch, task)
    assert mask.tolist() == PRESENT
    preds = model(batch)
    loss = head.loss(preds[task], batch, mask, LossConfig())
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    # the structure without targets plays no part
    changed = head.loss(
        preds[task], _absent_changed(batch, TASKS[task].columns), mask, LossConfig()
    )
    assert torch.equal(loss, changed)
    loss.backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("task", list(TASKS))
def test_head_metric_sums_are_what_reports_and_dashboards_read(task: str) -> None:
    model, batch = _model(task), _batch()
    head, spec = model.head(task), TASKS[task]
    preds = model(batch)
    sums = head.metric_sums(preds[task], batch, model.mask(batch, task))
    assert spec.metric in sums
    for total, count in sums.values():
        assert isinstance(count, int) and count > 0 and torch.isfinite(torch.as_tensor(total))

    epoch = MetricSums(model, distributed=False)
    epoch.update(preds, batch)
    metrics = epoch.compute("val/")
    key, higher = primary_metric([task])
    assert key == metric_key(task) and key in metrics  # what reports and early stopping read
    shown = [
        title
        for title, pattern in _validation_panels()
        if re.fullmatch(pattern.replace("$task", re.escape(task)), key)
    ]
    assert len(shown) == 1, shown  # on one dashboard panel: accuracy, or errors
    assert ("accuracy" in shown[0].lower()) == higher


@pytest.mark.parametrize("task", list(TASKS))
def test_a_task_absent_from_the_batch_adds_an_exact_zero_that_touches_its_head(task: str) -> None:
    """DDP expects a gradient for every parameter in every step, even of a head whose data set
    the batch does not hold."""
    model, batch = _model(task), _batch()
    for name in K.TARGETS:
        batch[f"{name}_mask"] = torch.zeros(batch.num_graphs, dtype=torch.bool)
    (loss,) = task_losses(model, model(batch), batch, LossConfig()).values()
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.head(task).parameters())
