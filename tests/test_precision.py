"""Training arithmetic (``run.precision``: bf16 autocast, TF32) and ``torch.compile`` of the
encoder (``run.compile``), on the CPU and, where there is one, the GPU."""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from matsci_ray.config import ExperimentConfig, LossConfig
from matsci_ray.data.dataset import shard_paths
from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
from matsci_ray.tasks.registry import TASKS
from matsci_ray.train.metrics import task_losses
from matsci_ray.train.precision import maybe_compile, training_autocast, uses_bf16
from tests.devices import CUDA, DEVICES
from tests.samples import ingest_in_process, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- bf16 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lips(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """LiPS frames (83 atoms, energy and forces) ingested, and their training rows with
    graphs at the tiny model's 4 Å."""
    root = ingest_in_process(
        "lips", samples / "lips" / "lips_devset.extxyz", tmp_path_factory.mktemp("lips")
    )
    table = pa.concat_tables(pq.read_table(p) for p in shard_paths(root, "lips", "train"))
    columns = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}
    return root, RadiusGraphTransform(4.0)(columns)


def _lips_batch(rows: dict, start: int, size: int = 4) -> object:
    picked = {k: v[start : start + size] for k, v in rows.items()}
    return rows_to_pyg_batch(picked, TASKS["lips-forces"].columns)


def _bf16(config: ExperimentConfig) -> ExperimentConfig:
    return config.model_copy(update={"run": config.run.model_copy(update={"precision": "bf16"})})


def _step(
    model: nn.Module,
    batch: object,
    config: ExperimentConfig,
    optimizer: torch.optim.Optimizer | None = None,
    device: str = "cpu",
) -> float:
    """One optimiser step (default: a fresh AdamW at lr 1e-3), as the loop takes it on
    ``device`` (where model and batch are); the loss."""
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    with training_autocast(config, torch.device(device)):
        preds = model(batch)
    loss = torch.stack(list(task_losses(model, preds, batch, LossConfig()).values())).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _energies_forces(model: nn.Module, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out = model(batch, forces=True)["lips-forces"]
    return out["value"].detach(), out["forces"].detach()


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_step_agrees_with_fp32(lips: tuple[Path, dict], device: str) -> None:
    """From the same weights, one training step under bf16 autocast and one in fp32 give
    models whose fp32 energies and forces on other frames agree to within 1 % (forces, as a
    norm of the difference) and 1 meV/atom (energies).

    Why those bounds: bf16 keeps 8 significant bits, a relative rounding of 2^-9 = 0.2 % per
    rounded input; a tiny EGNN rounds its features a few times per layer, so its features, and
    the gradients that flow back through them, are off by a few tenths of a percent, and one
    AdamW step of lr 1e-3 moves each weight by at most about 1e-3 either way. A forward in bf16
    that broke the fp32 split (positions, edge vectors or the energy sum in bf16) is off by far
    more: an 83-atom LiPS energy of about -350 eV rounds in bf16 to a 2 eV grid."""
    root, rows = lips
    model, config = tiny_model("lips-bf16", root, ["lips-forces"])
    fp32, bf16 = model.to(device), copy.deepcopy(model).to(device)
    train, held_out = _lips_batch(rows, 0).to(device), _lips_batch(rows, 40).to(device)
    _step(fp32, train, config, device=device)
    _step(bf16, train, _bf16(config), device=device)
    (e32, f32), (e16, f16) = _energies_forces(fp32, held_out), _energies_forces(bf16, held_out)
    atoms = held_out.natoms.to(torch.float32)
    assert float(((e16 - e32).abs() / atoms).max()) < 1e-3
    assert float((f16 - f32).norm() / f32.norm()) < 0.01
    assert not torch.equal(f16, f32)  # the bf16 step did run in bf16


@pytest.mark.slow
def test_bf16_training_lowers_the_loss(lips: tuple[Path, dict]) -> None:
    root, rows = lips
    bf16, config = tiny_model("lips-bf16", root, ["lips-forces"])
    optimizer = torch.optim.AdamW(bf16.parameters(), lr=3e-3)
    batches = [_lips_batch(rows, 4 * k) for k in range(10)]
    losses = [_step(bf16, batches[k % 10], _bf16(config), optimizer) for k in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["egnn", "megnet", "gala"])
def test_bf16_forward_keeps_energies_forces_and_stress_in_fp32(
    name: str, lips: tuple[Path, dict], device: str
) -> None:
    """Every encoder that runs under autocast: predictions come out in fp32, the encoder's
    matmuls in bf16 (they differ from fp32), and a double backward (force training) runs."""
    from matsci_ray.models import build_encoder
    from matsci_ray.models.registry import MODELS
    from matsci_ray.potential import MatSciModel

    _, rows = lips
    torch.manual_seed(0)
    encoder = build_encoder(name, 4.0, MODELS.get(name).small_params())
    model = MatSciModel(encoder, [TASKS["lips-forces"]], 16).train().to(device)
    batch = _lips_batch(rows, 0, 2).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model(batch, stress=True)["lips-forces"]
    assert {out[k].dtype for k in ("value", "forces", "stress")} == {torch.float32}
    (out["forces"].square().sum() + out["stress"].square().sum()).backward()  # double backward
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    assert not torch.equal(out["value"].detach(), model(batch)["lips-forces"]["value"].detach())


@pytest.mark.parametrize("device", [CUDA])
def test_tf32_moves_energies_and_forces_by_less_than_stated(
    lips: tuple[Path, dict], device: str
) -> None:
    """``run.precision: tf32`` lets CUDA matmuls round their float32 inputs to TF32's 10-bit
    mantissa (a relative 2^-11, five times bf16's precision): a tiny EGNN's LiPS energies move
    by under 1 meV/atom and its forces by under 1 %, the same bounds as a bf16 step, and they
    do move (TF32 was used)."""
    from matsci_ray.train.precision import set_matmul_precision

    root, rows = lips
    model, config = tiny_model("lips-tf32", root, ["lips-forces"])
    model = model.to(device)
    batch = _lips_batch(rows, 40).to(device)
    tf32 = config.model_copy(update={"run": config.run.model_copy(update={"precision": "tf32"})})
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        e32, f32 = _energies_forces(model, batch)
        set_matmul_precision(tf32)
        e_tf, f_tf = _energies_forces(model, batch)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    atoms = batch.natoms.to(torch.float32)
    assert float(((e_tf - e32).abs() / atoms).max()) < 1e-3
    assert float((f_tf - f32).norm() / f32.norm()) < 0.01
    assert not torch.equal(f_tf, f32)


def test_mace_asked_for_bf16_trains_in_fp32_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from matsci_ray.train.precision import set_matmul_precision

    egnn = ExperimentConfig.model_validate(
        {
            "name": "bf16",
            "tasks": ["lips-forces"],
            "data": {"root": "."},
            "run": {"precision": "bf16"},
        }
    )
    # not validated again: a MACE config's validation imports e3nn, which takes a while
    config = egnn.model_copy(update={"model": egnn.model.model_copy(update={"name": "mace"})})
    with caplog.at_level(logging.WARNING, logger="matsci_ray.train.precision"):
        set_matmul_precision(config)
    assert not uses_bf16(config)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "matsci_ray.train.precision"]
    assert "mace trains in fp32, not bf16" in line and "tensordot" in line
    assert uses_bf16(egnn)


# --- torch.compile -------------------------------------------------------------------------


@pytest.fixture
def compiler(device: str) -> Iterator[None]:
    if device == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++ or c++), and none is here")
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.usefixtures("compiler")
def test_compile_trains_energy_only_and_falls_back_for_forces(
    lips: tuple[Path, dict], caplog: pytest.LogCaptureFixture, device: str
) -> None:
    """A tiny EGNN on LiPS energies compiles, and its compiled training step computes what
    the eager one does; with forces (a double backward) it stays eager and says why."""
    root, rows = lips
    model, config = tiny_model("compiled", root, ["lips-energy"])
    config.run.compile = True
    model = model.to(device)
    eager = copy.deepcopy(model)
    assert maybe_compile(model, config, torch.device(device))
    batch = rows_to_pyg_batch({k: v[:4] for k, v in rows.items()}, TASKS["lips-energy"].columns)
    losses = [_step(m, batch.to(device), config, device=device) for m in (model, eager)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for compiled, plain in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-6)

    forces, forces_config = tiny_model("compiled-forces", root, ["lips-forces"])
    forces_config.run.compile = True
    with caplog.at_level(logging.WARNING, logger="matsci_ray.train.precision"):
        assert not maybe_compile(forces, forces_config, torch.device(device))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "matsci_ray.train.precision"]
    assert "trains uncompiled" in line and "double backward" in line
