"""Sharded validation: each worker scores its share of the validation split, and the all-reduced
sums give the figures of one process scoring the whole split."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from matsci_ray.config import ExperimentConfig
from matsci_ray.train.metrics import MetricSums
from tests.samples import TINY_EGNN, ingest_in_process

METRIC = "val/mp-band-gap/mse"


def _uneven_ranks(rank: int, init_file: str, out: str) -> None:
    """Rank 0 has sums for two tasks; rank 1 saw no row at all (an empty shard)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    sums = MetricSums(model=None)  # type: ignore[arg-type]  # compute needs no model
    if rank == 0:
        sums.add_loss("a", 2.0, 3)
        sums.add_loss("b", 1.0, 1)
    else:
        sums.add_loss("a", 4.0, 1)
    Path(f"{out}.{rank}").write_text(json.dumps(sums.compute()))
    dist.destroy_process_group()


def test_metric_sums_all_reduce_when_ranks_hold_different_keys(tmp_path: Path) -> None:
    """Every rank joins the all-reduce with the union of the keys: (2*3 + 4*1) / 4 for task
    a, 1 for task b (seen by rank 0 only), on both ranks."""
    out = str(tmp_path / "metrics")
    mp.spawn(_uneven_ranks, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    for rank in (0, 1):
        metrics = json.loads(Path(f"{out}.{rank}").read_text())
        assert metrics == pytest.approx({"a/loss": 2.5, "b/loss": 1.0})


@pytest.fixture(scope="module")
def data_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ingested")
    docs = samples / "materials_project" / "summary_docs.jsonl"
    return ingest_in_process("materials-project", docs, root)


def _config(root: Path, storage: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "sharded",
            "tasks": ["mp-band-gap"],
            "data": {"root": str(root), "cutoff": 4.0, "batch_size": 4, "max_train_samples": 16},
            "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
            "optim": {"epochs": 1},
            "run": {
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "storage": str(storage),
                "threads_per_worker": 1,
            },
        }
    )


@pytest.mark.slow  # a Ray session and two Ray Data executions
@pytest.mark.usefixtures("ray_local")
def test_validation_split_is_dealt_to_workers_once_each(data_root: Path, tmp_path: Path) -> None:
    """The validation set goes to the workers unequally: every row to exactly one worker,
    none dropped (an equal split would drop rows to even the shards out)."""
    import ray.data

    from matsci_ray.train.entry import ShardedValidation

    ids = [f"s{i}" for i in range(11)]  # odd: an equal split of 2 would drop one
    val = ray.data.from_items([{"id": i} for i in ids]).repartition(4).materialize()
    train_ds = ray.data.from_items([{"id": i} for i in ids]).materialize()
    shards = ShardedValidation().configure({"train:x": train_ds, "val:x": val}, 2, None, None)
    seen = _read_concurrently([shard["val:x"] for shard in shards])
    assert sorted(seen[0] + seen[1]) == sorted(ids)
    assert all(seen), seen  # both workers score a share
    train = _read_concurrently([shard["train:x"] for shard in shards])
    assert len(train[0]) == len(train[1])  # train stays equal (DDP needs equal step counts)

    # one worker reads each data set whole, epoch after epoch, with no split to coordinate
    [alone] = ShardedValidation().configure({"train:x": train_ds, "val:x": val}, 1, None, None)
    for _ in range(2):
        assert sorted(row["id"] for row in alone["val:x"].iter_rows()) == sorted(ids)
        assert sorted(row["id"] for row in alone["train:x"].iter_rows()) == sorted(ids)


@pytest.mark.usefixtures("ray_local")
def test_max_val_samples_validates_on_a_fixed_sample(data_root: Path, tmp_path: Path) -> None:
    """``data.max_val_samples``: the validation data set is a seeded sample of that size."""
    from matsci_ray.train.trainer import build_trainer

    raw = _config(data_root, tmp_path).model_dump(mode="json")
    raw["data"]["max_val_samples"] = 5
    trainer = build_trainer(ExperimentConfig.model_validate(raw))
    val = trainer.datasets["val:materials-project"]
    first, again = (sorted(r["sample_id"] for r in val.iter_rows()) for _ in range(2))
    assert len(first) == 5 and first == again


# What a fresh controller process imports to unpickle what the driver sends it.
CONTROLLER_SIDE = """
import sys
import ray
import ray._private.ray_constants as constants
from ray import cloudpickle
constants.ENABLE_RAY_CLUSTER = False  # the session's Ray is on loopback (matsci_ray.ray_env)
ray.init(address=sys.argv[1])  # the data sets' plans hold object refs
cloudpickle.loads(sys.stdin.buffer.read())
loop = (
    "matsci_ray.train.loop",
    "matsci_ray.train.worker",
    "matsci_ray.potential",
    "matsci_ray.generative.train",
)
print(sorted({"torch_geometric" if m.startswith("torch_geometric") else m for m in sys.modules
              if m.startswith("torch_geometric") or m in loop
              or m.startswith("matsci_ray.models.") and m != "matsci_ray.models.registry"}))
"""


@pytest.mark.usefixtures("ray_local")
def test_the_controller_imports_no_training_loop_and_no_pyg(
    data_root: Path, tmp_path: Path
) -> None:
    """Ray Train's controller, a process of its own for every run, unpickles the run's
    context (data config, loop config) and its data sets' plans (graphs built in the stream)
    before it starts a worker: none of it may pull in the training loop, the models or PyG,
    which the controller never runs and every run would wait for."""
    import subprocess
    import sys

    import ray
    from ray import cloudpickle

    from matsci_ray.train.trainer import build_trainer

    raw = _config(data_root, tmp_path).model_dump(mode="json")
    raw["data"]["cache_graphs"] = "never"  # the streaming plans: RadiusGraphTransform in them
    trainer = build_trainer(ExperimentConfig.model_validate(raw))
    sent = cloudpickle.dumps(
        (trainer.train_run_context, trainer.datasets, trainer.train_loop_per_worker)
    )
    out = subprocess.run(
        [sys.executable, "-c", CONTROLLER_SIDE, ray.get_runtime_context().gcs_address],
        input=sent,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert out.stdout.decode().strip() == "[]", out.stdout.decode()


def _read_concurrently(splits: list) -> list[list[str]]:
    """Each split's ids, read as workers read them: at once (a streaming split's pass starts
    only when every split has asked for it)."""
    with ThreadPoolExecutor(len(splits)) as pool:
        return list(pool.map(lambda split: [row["id"] for row in split.iter_rows()], splits))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_two_workers_sharded_metrics_equal_whole_split_evaluation(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-worker epoch validates on shards (blocks of 4 rows, so both workers score rows);
    its reported metrics equal ``evaluate_checkpoint`` of the same checkpoint, one process
    over the whole validation split. The second epoch scores the batches each worker kept
    from the first (``data.val_keep_max_atoms``): still every row once."""
    from matsci_ray.train import trainer
    from matsci_ray.train.evaluate import evaluate_checkpoint

    monkeypatch.setattr(trainer, "CACHE_BLOCK_ROWS", 4)
    config = _config(data_root, tmp_path / "runs")
    config = config.model_copy(update={"optim": config.optim.model_copy(update={"epochs": 2})})
    result = trainer.build_trainer(config).fit()
    assert result.error is None
    whole = evaluate_checkpoint(result.checkpoint.path, split="val")
    assert result.metrics[METRIC] == pytest.approx(whole["mp-band-gap/mse"], rel=1e-5)
    assert result.metrics["val/mp-band-gap/mae"] == pytest.approx(
        whole["mp-band-gap/mae"], rel=1e-5
    )
    assert result.metrics["workers"] == 2
