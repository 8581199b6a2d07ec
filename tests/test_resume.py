"""``matsci-ray train --resume`` and restarts: a run stopped after epoch k, or mid-epoch at a
``run.checkpoint_every_steps`` checkpoint, continues with the optimiser, schedule and data
order it had (skipping the batches its epoch already trained), and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from matsci_ray.cli.main import main
from matsci_ray.config import ExperimentConfig
from matsci_ray.train.checkpoint import checkpoint_epoch, read_checkpoint
from matsci_ray.train.telemetry import read_history
from tests.samples import TINY_EGNN

pytestmark = pytest.mark.usefixtures("ray_local")

METRIC = "val/mp-band-gap/mse"


@pytest.fixture(scope="module")
def data_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions

    root = tmp_path_factory.mktemp("ingested")
    docs = [samples / "materials_project" / "summary_docs.jsonl"]
    run_ingest("materials-project", docs, root, IngestOptions(source="materials-project"))
    return root


def _raw(root: Path, storage: Path, name: str, **run: object) -> dict:
    """One worker, a cosine schedule (the lr moves every step), the cached-graph path."""
    return {
        "name": name,
        "tasks": ["mp-band-gap"],
        "data": {"root": str(root), "cutoff": 4.0, "batch_size": 16, "max_train_samples": 64},
        "model": {"name": "egnn", "params": TINY_EGNN, "head_hidden": 16},
        "optim": {"lr": 3e-3, "epochs": 3, "scheduler": "cosine"},
        "run": {
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "storage": str(storage),
            "threads_per_worker": 1,
            **run,
        },
    }


def _config(raw: dict) -> ExperimentConfig:
    return ExperimentConfig.model_validate(raw)


def _checkpoint_at(run_dir: Path, epoch: int) -> Path:
    found = [p for p in run_dir.glob("checkpoint_*/") if checkpoint_epoch(p) == epoch]
    assert found, f"no checkpoint of epoch {epoch} in {run_dir}"
    return found[0]


def _stop_after_epoch_2(raw: dict) -> Path:
    """Run ``raw`` (3 epochs) so that it dies as epoch 3 starts, with no retry (its worker
    exits, as a lost node's would): the run's epoch-2 checkpoint."""
    from matsci_ray.train.trainer import build_trainer

    config = _config({**raw, "run": {**raw["run"], "fail_at_epoch": 2, "max_failures": 0}})
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's failure wrapper, whatever its type
        build_trainer(config).fit()
    run_dir = config.run.storage / config.name
    assert [row["epoch"] for row in read_history(run_dir)] == [1, 2]
    return _checkpoint_at(run_dir, 2)


STEPS_PER_EPOCH = 4  # 64 rows / batch 16, one worker


def _stop_at_step_6(raw: dict) -> tuple[Path, Path]:
    """Run ``raw`` so that it dies after reporting its step-6 checkpoint (2 steps into epoch
    2), with no retry: its checkpoints of epoch 1's end (kept as the best scored) and of step
    6 (kept as the latest)."""
    from matsci_ray.train.trainer import build_trainer

    config = _config({**raw, "run": {**raw["run"], "fail_at_step": 6, "max_failures": 0}})
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's failure wrapper, whatever its type
        build_trainer(config).fit()
    by_step = {
        read_checkpoint(p)["scheduler"]["steps"]: p
        for p in (config.run.storage / config.name).glob("checkpoint_*/")
    }
    epoch_end, mid = by_step[STEPS_PER_EPOCH], by_step[6]
    assert checkpoint_epoch(epoch_end) == 1
    state = read_checkpoint(mid)
    assert state["epoch"] == 1 and state["scheduler"]["epoch_start"] == STEPS_PER_EPOCH
    return epoch_end, mid


@pytest.mark.slow
def test_continued_runs_end_where_an_uninterrupted_run_ends(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 epochs (12 steps, a checkpoint every 3) in one go, against three runs continued
    from a run that crashed after its step-6 checkpoint (2 steps into epoch 2): ``resume_from``
    its epoch-1 checkpoint, ``resume_from`` its step-6 checkpoint, and a worker that dies
    after that checkpoint and is restarted by ``FailureConfig`` within its run. All end at
    step 12 with the same lr and validation error, their histories holding epochs 1-3 once.
    (One uninterrupted run serves all three: checkpoints do not change the arithmetic.)"""
    from matsci_ray.train import trainer
    from matsci_ray.train.trainer import build_trainer

    # 8 cached blocks of 8 rows: each epoch's block order is one of 8! (with the 64-row
    # default the 64 sampled rows are one block, and the order would not be tested)
    monkeypatch.setattr(trainer, "CACHE_BLOCK_ROWS", 8)
    storage = tmp_path / "runs"

    def raw(name: str, **run: object) -> dict:
        return _raw(data_root, storage, name, checkpoint_every_steps=3, **run)

    full = build_trainer(_config(raw("full"))).fit()
    assert full.metrics["step"] == 3 * STEPS_PER_EPOCH
    after_epoch_1, mid_epoch_2 = _stop_at_step_6(raw("stopped"))
    continued = {
        "resumed": build_trainer(_config(raw("resumed")), resume_from=after_epoch_1).fit(),
        "resumed-mid": build_trainer(_config(raw("resumed-mid")), resume_from=mid_epoch_2).fit(),
        "restarted": build_trainer(_config(raw("restarted", fail_at_step=6, max_failures=1))).fit(),
    }
    assert (storage / "restarted" / ".failed-at-step-6").exists()  # the worker did die
    for name, run in continued.items():
        assert run.metrics["epoch"] == 3 and run.metrics["step"] == full.metrics["step"], name
        assert run.metrics["lr"] == pytest.approx(full.metrics["lr"], rel=1e-12), name
        # one worker, blocks in plan order (data.preserve_order), one thread, the trained
        # batches skipped: the same arithmetic in the same order
        assert run.metrics[METRIC] == pytest.approx(full.metrics[METRIC], rel=1e-6), name
        assert [row["epoch"] for row in read_history(storage / name)] == [1, 2, 3], name
        lines = (storage / name / "history.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3], name  # each once


def test_data_order_is_the_epochs_own(tmp_path: Path) -> None:
    """Each pass's order follows the announced epoch alone: announcing epoch 1 again gives
    epoch 1's order, however many executions came between (cached blocks and file reads)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import ray.data

    from matsci_ray.train.data_order import (
        EpochFileShuffle,
        EpochOrder,
        announce,
        block_order,
        randomize_blocks_by_epoch,
    )

    path = tmp_path / "order.json"
    files = []
    for k in range(12):
        files.append(str(tmp_path / f"part-{k:02d}.csv"))
        pcsv.write_csv(pa.table({"id": list(range(8 * k, 8 * k + 8))}), files[-1])
    with block_order(True):
        blocks = ray.data.range(12 * 8, override_num_blocks=12).materialize()
        cached = randomize_blocks_by_epoch(blocks, EpochOrder(7, "c", str(path)))
        shuffle = EpochFileShuffle(7, order=EpochOrder(7, "f", str(path)))
        streamed = ray.data.read_csv(files, shuffle=shuffle)
    for name, ds in (("c", cached), ("f", streamed)):
        orders = {}
        for epoch in (0, 1, 2, 1, 1):
            announce(path, name, epoch, 0)
            order = [int(row["id"]) for row in ds.take_all()]
            assert orders.setdefault(epoch, order) == order, (name, epoch)
            assert sorted(order) == list(range(96))
        assert len({tuple(o) for o in orders.values()}) == 3, name  # each epoch its own


def _finish_in_reverse(batch: dict) -> dict:
    """Block k of 8 (8 ids each) sleeps (7 - k) / 10 s: later blocks finish first."""
    import time

    time.sleep((7 - int(batch["id"][0]) // 8) / 10)
    return batch


def test_block_order_keeps_plan_order_and_restores_the_context() -> None:
    """What made one seed's run differ from the same seed's run: a ``materialize`` (the
    cached graphs) stores blocks in the order their tasks finish, so the seeded epoch
    permutation acts on a different list each run. A data set made under
    ``block_order(True)`` (the trainer's, ``data.preserve_order``) carries the setting in its
    own context, and one made under ``block_order(False)`` does not, whatever the driver's;
    its blocks stay in plan order though its tasks are made to finish in reverse (whether
    they do depends on how many Ray runs at once: in a standalone 2-CPU Ray they did). The
    driver's context is left as it was."""
    import ray.data

    from matsci_ray.train.data_order import block_order

    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    with block_order(False):
        unordered = ray.data.range(64, override_num_blocks=8)
    with block_order(True):
        ds = ray.data.range(64, override_num_blocks=8)
        ds = ds.map_batches(_finish_in_reverse, batch_size=None, num_cpus=0.25)
    assert ds.context.execution_options.preserve_order
    assert not unordered.context.execution_options.preserve_order
    firsts = [int(batch["id"][0]) for batch in ds.materialize().iter_batches(batch_size=None)]
    assert firsts == list(range(0, 64, 8))
    assert options.preserve_order == before


@pytest.mark.parametrize("preserve", [True, False])
def test_trainer_hands_out_blocks_as_data_preserve_order_says(
    data_root: Path, tmp_path: Path, preserve: bool
) -> None:
    """Every data set the trainer plans, the shards' execution options the workers get, and
    the stream ``evaluate`` scores carry ``data.preserve_order``; the driver's own Ray Data
    context is left as it was."""
    import ray.data

    from matsci_ray.train.trainer import build_trainer, graph_dataset

    raw = _raw(data_root, tmp_path / "runs", f"order-{preserve}")
    raw["data"]["preserve_order"] = preserve
    context = ray.data.DataContext.get_current().execution_options
    before = context.preserve_order
    built = build_trainer(_config(raw))
    test = graph_dataset(_config(raw), "materials-project", "test")
    assert context.preserve_order == before
    assert test.context.execution_options.preserve_order == preserve
    assert built.datasets and all(
        ds.context.execution_options.preserve_order == preserve for ds in built.datasets.values()
    )
    options = built.data_config._resolve_execution_options("train:materials-project")
    assert options.preserve_order == preserve


def _write(raw: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_cli_resume_continues_the_stopped_run(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``matsci-ray train CONFIG --resume CHECKPOINT`` (what failed under Ray Train V2) on the
    streamed-graph path, in the stopped run's own directory: epoch 3 runs, once."""
    storage = tmp_path / "runs"
    raw = _raw(data_root, storage, "cli")
    raw["data"]["cache_graphs"] = "never"
    checkpoint = _stop_after_epoch_2(raw)
    config = _write(raw, tmp_path / "cli.yaml")

    assert main(["train", str(config), "--resume", str(checkpoint)]) == 0
    assert f"checkpoint: {storage / 'cli'}" in capsys.readouterr().out
    lines = (storage / "cli" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_cli_bad_resume_is_one_line(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing path, a directory without a checkpoint, another model, or no epochs left:
    exit 2 and one line naming the checkpoint (and the field), before any Ray work."""
    import torch

    from matsci_ray.potential import MatSciModel
    from matsci_ray.train.checkpoint import save_checkpoint

    storage = tmp_path / "runs"
    raw = _raw(data_root, storage, "bad")
    config = _write(raw, tmp_path / "bad.yaml")
    saved = tmp_path / "saved"
    saved.mkdir()
    torch.manual_seed(0)
    save_checkpoint(saved, MatSciModel.from_config(_config(raw)), _config(raw), epoch=3)
    wider = {**raw, "model": {**raw["model"], "params": {**TINY_EGNN, "hidden_dim": 32}}}

    cases = [
        (config, tmp_path / "missing", "no such checkpoint"),
        (config, tmp_path, "no checkpoint.pt"),
        (_write(wider, tmp_path / "wider.yaml"), saved, "model.params.hidden_dim is 16"),
        (config, saved, "nothing left to resume"),
    ]
    for yaml_path, checkpoint, words in cases:
        capsys.readouterr()
        assert main(["train", str(yaml_path), "--resume", str(checkpoint)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("matsci-ray train: error: "), lines
        assert str(checkpoint) in lines[0] and words in lines[0], lines[0]
    assert not storage.exists()  # failed before any run started
