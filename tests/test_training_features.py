"""Training features: a moving average of the weights (``optim.ema_decay``) and atom-balanced
batches (``data.max_atoms_per_batch``), and one GPU worker using both (precision and
compile: test_precision.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from matsci_ray import keys as K
from matsci_ray.config import ExperimentConfig
from matsci_ray.graphs.batching import AtomPacker
from matsci_ray.train.ema import ExponentialMovingAverage
from tests.devices import CUDA
from tests.samples import TINY_EGNN, ingest_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the moving average --------------------------------------------------------------------


def test_ema_follows_the_update_rule_and_copies_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = ExponentialMovingAverage(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # moves BatchNorm's running statistics (buffers)
        decay = min(0.9, (1 + step) / (10 + step))  # the warm-up, then the decay
        expected = [
            decay * e + (1 - decay) * p.detach()
            for e, p in zip(expected, model.parameters(), strict=True)
        ]
        ema.update(model)
    for averaged, want in zip(ema.averaged.parameters(), expected, strict=True):
        torch.testing.assert_close(averaged, want, rtol=1e-5, atol=1e-6)
    for averaged, trained in zip(ema.averaged.parameters(), model.parameters(), strict=True):
        assert not torch.allclose(averaged, trained)
    for averaged, trained in zip(ema.averaged.buffers(), model.buffers(), strict=True):
        assert torch.equal(averaged, trained)
    assert ema.updates == 30 and not ema.averaged.training


# --- atom-balanced batches -----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_stream(samples: Path) -> list[dict[str, np.ndarray]]:
    """Real atom counts of MP cells (1-ish to tens of atoms) and OC20 slabs (33-185 atoms),
    interleaved and cut into row batches of 1 to 16 rows, as a mixed Ray Data stream hands
    them over; ``atomic_numbers`` an object column, as Ray gives list columns."""
    import ase.io

    docs = (samples / "materials_project" / "summary_docs.jsonl").read_text().splitlines()
    rows = [(f"mp:{k}", len(json.loads(d)["structure"]["sites"])) for k, d in enumerate(docs)]
    for path in sorted((samples / "oc20" / "trajectories").glob("random*.traj"))[:8]:
        rows += [(f"{path.stem}:{i}", len(a)) for i, a in enumerate(ase.io.read(path, "0:40:8"))]
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    batches, start = [], 0
    while start < len(rows):
        part = rows[start : start + int(rng.integers(1, 17))]
        numbers = np.empty(len(part), dtype=object)
        numbers[:] = [np.full(n, 8, dtype=np.int64) for _, n in part]
        batches.append(
            {
                K.SAMPLE_ID: np.array([s for s, _ in part]),
                K.NATOMS: np.array([n for _, n in part], dtype=np.int32),
                K.ATOMIC_NUMBERS: numbers,
            }
        )
        start += len(part)
    return batches


@pytest.mark.parametrize("limit", [64, 150, 400])
def test_atom_packer_bounds_every_batch_and_uses_every_row_once(
    limit: int, mixed_stream: list[dict[str, np.ndarray]]
) -> None:
    packer = AtomPacker(limit)
    packed = list(packer(iter(mixed_stream)))
    given = np.concatenate([b[K.SAMPLE_ID] for b in mixed_stream])
    natoms = np.concatenate([b[K.NATOMS] for b in mixed_stream])
    assert np.array_equal(np.concatenate([b[K.SAMPLE_ID] for b in packed]), given)  # in order
    sizes = [int(b[K.NATOMS].sum()) for b in packed]
    for batch, size in zip(packed, sizes, strict=True):
        assert size <= limit or len(batch[K.NATOMS]) == 1, size
        lengths = [len(z) for z in batch[K.ATOMIC_NUMBERS]]
        assert lengths == batch[K.NATOMS].tolist()  # the object column travelled with its rows
    for size, following in zip(sizes, packed[1:], strict=False):
        assert size + int(following[K.NATOMS][0]) > limit  # greedy: the next row did not fit
    assert packer.oversized == int((natoms > limit).sum())
    if limit == 64:
        assert packer.oversized > 0  # OC20 slabs are larger: each alone


@pytest.fixture(scope="module")
def mp_oc20_root(samples: Path, tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> Path:
    """Materials Project documents and five OC20 relaxations (four hash into train, one into
    test, none of the samples into val), ingested into one root."""
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions

    root = tmp_path_factory.mktemp("mp-oc20")
    ingest_in_process(
        "materials-project", samples / "materials_project" / "summary_docs.jsonl", root
    )
    trajectories = tmp_path_factory.mktemp("oc20-trajectories")
    for path in sorted((samples / "oc20" / "trajectories").glob("random*.traj"))[:5]:
        (trajectories / path.name).symlink_to(path)  # the samples, read where they are
    options = IngestOptions(source="oc20-s2ef")
    run_ingest("oc20-s2ef", [trajectories], root, options, progress=False)
    return root


def _mixed_config(root: Path, storage: Path, name: str, **run: object) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "tasks": ["mp-band-gap", "s2ef-energy"],
            "data": {
                "root": str(root),
                "cutoff": 4.0,
                "batch_size": 8,
                "max_train_samples": 40,
                "max_atoms_per_batch": 120,
                "val_split": "test",
            },
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
            "optim": {"lr": 3e-3, "epochs": 2, "scheduler": "cosine"},
            "run": {
                "num_workers": 1,
                "cpus_per_worker": 0.5,
                "storage": str(storage),
                "threads_per_worker": 1,
                **run,
            },
        }
    )


@pytest.mark.slow
def test_mixed_ray_data_epoch_packs_every_row_once(mp_oc20_root: Path, tmp_path: Path) -> None:
    """The loop's own epoch over Ray Data (two data sets mixed proportionally, one worker):
    every batch within the atom bound unless one slab alone exceeds it, every row once."""
    from matsci_ray.train.batches import train_batches
    from matsci_ray.train.trainer import graph_dataset

    config = _mixed_config(mp_oc20_root, tmp_path, "packing")
    shards, sizes, expected = {}, {}, []
    for name in config.datasets:
        ds = graph_dataset(config, name, "train", 40, shuffle_files=False)
        shards[name], sizes[name] = ds, ds.count()
        expected += [(name, s) for s in ds.select_columns([K.SAMPLE_ID]).to_pandas()[K.SAMPLE_ID]]
    packer = AtomPacker(120)
    seen = []
    for rows in train_batches(config, shards, sizes, 8, 1, packer=packer):
        atoms = np.asarray(rows[K.NATOMS])
        assert atoms.sum() <= 120 or len(atoms) == 1
        seen += list(zip(rows[K.DATASET], rows[K.SAMPLE_ID], strict=True))
    assert sorted(seen) == sorted(expected)  # each row exactly once
    assert {name for name, _ in seen} == set(config.datasets)


@pytest.mark.slow
def test_two_workers_train_on_atom_batches(mp_oc20_root: Path, tmp_path: Path) -> None:
    """Two DDP workers whose shards pack into different numbers of batches keep in step
    (the epoch ends when both are out), and the run trains, validates and checkpoints."""
    from matsci_ray.train.telemetry import read_history
    from matsci_ray.train.trainer import build_trainer

    config = _mixed_config(mp_oc20_root, tmp_path / "runs", "atom-batches", num_workers=2)
    result = build_trainer(config).fit()
    assert result.error is None
    history = read_history(config.run.storage / config.name)
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert row["train/oversized_structures"] >= 0
        assert np.isfinite(row["train/s2ef-energy/loss"]) and np.isfinite(
            row["val/s2ef-energy/mse"]
        )
    assert history[-1]["step"] > 2


@pytest.mark.slow
@pytest.mark.parametrize("device", [CUDA])
def test_one_gpu_worker_trains_in_bf16_with_ema_on_atom_batches(
    mp_oc20_root: Path, samples: Path, tmp_path: Path, device: str
) -> None:
    """``run.use_gpu``: one Ray Train worker on the GPU (NCCL) trains the mixed MP and OC20
    run in bf16 with a moving average on atom-bounded batches; its checkpoint, read on the CPU,
    predicts what it predicts on the GPU."""
    import ase.io

    from matsci_ray.inference import Predictor
    from matsci_ray.train.telemetry import read_history
    from matsci_ray.train.trainer import build_trainer

    config = _mixed_config(mp_oc20_root, tmp_path / "runs", "gpu", use_gpu=True, precision="bf16")
    optim = config.optim.model_copy(update={"ema_decay": 0.9, "epochs": 3})
    config = config.model_copy(update={"optim": optim})
    result = build_trainer(config).fit()
    assert result.error is None
    history = read_history(config.run.storage / config.name)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    losses = [row["train/s2ef-energy/loss"] for row in history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    first = sorted((samples / "oc20" / "trajectories").glob("random*.traj"))[0]
    atoms = ase.io.read(first, "0:3")
    on_gpu = Predictor(result.checkpoint.path, device).predict(atoms)
    on_cpu = Predictor(result.checkpoint.path, "cpu").predict(atoms)
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        for task, value in cpu.items():
            np.testing.assert_allclose(gpu[task], value, rtol=1e-4, atol=1e-5, err_msg=task)


# --- the moving average in training: validated, checkpointed, resumed -------------------------


@pytest.fixture(scope="module")
def mp_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = samples / "materials_project" / "summary_docs.jsonl"
    return ingest_in_process("materials-project", docs, tmp_path_factory.mktemp("mp"))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_ema_is_validated_checkpointed_and_resumed_exactly(mp_root: Path, tmp_path: Path) -> None:
    """An uninterrupted run and one whose worker dies after the step-6 checkpoint (mid-epoch)
    end with the same averaged and raw weights; the checkpoint's model is the average, and it
    alone reproduces the run's validation metric (validation scored the average)."""
    from matsci_ray.train.checkpoint import read_checkpoint
    from matsci_ray.train.evaluate import evaluate_checkpoint
    from matsci_ray.train.trainer import build_trainer
    from tests.test_resume import _raw

    def config(name: str, **run: object) -> ExperimentConfig:
        raw = _raw(mp_root, tmp_path / "runs", name, checkpoint_every_steps=3, **run)
        raw["optim"]["ema_decay"] = 0.9
        return ExperimentConfig.model_validate(raw)

    full = build_trainer(config("full")).fit()
    restarted = build_trainer(config("restarted", fail_at_step=6, max_failures=1)).fit()
    assert (tmp_path / "runs" / "restarted" / ".failed-at-step-6").exists()
    a, b = read_checkpoint(full.checkpoint.path), read_checkpoint(restarted.checkpoint.path)
    assert a["ema"]["updates"] == b["ema"]["updates"] == full.metrics["step"] == 12
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b["ema"]["raw_model"][key], a["ema"]["raw_model"][key])
    assert any(
        not torch.equal(value, a["ema"]["raw_model"][key]) for key, value in a["model"].items()
    )
    metric = "mp-band-gap/mse"
    scored = evaluate_checkpoint(full.checkpoint.path, split="val")[metric]
    assert scored == pytest.approx(full.metrics[f"val/{metric}"], rel=1e-5)
