"""``optim.max_minutes`` with several workers: each reads its own clock from its own start, so
near the limit one can be out of time and another not. They must still stop after the same
epoch: a worker that went on alone waited for ever in the next epoch's data split (seen with
two workers in ``benchmarks/mace_native.py``). Two real processes in a gloo group, as Ray
Train's workers are."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing

from matsci_ray.config import ExperimentConfig
from matsci_ray.train.loop import should_stop

CONFIG = {
    "name": "limit",
    "tasks": ["lips-forces"],
    "data": {"root": "/nowhere"},
    "optim": {"max_minutes": 1.0},
}


def _decide(rank: int, tmp: Path) -> None:
    """On each rank: the stop decision when only rank 0 is past the limit, then when neither
    is; written to ``rank<r>.json``."""
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank, world_size=2)
    # the fields of the loop's TrainState that should_stop reads
    state = SimpleNamespace(
        config=ExperimentConfig.model_validate(CONFIG),
        world=2,
        device=torch.device("cpu"),
        stale=0,
    )
    now = time.monotonic()
    decisions = {
        "rank 0 out of time": should_stop(state, now - (90.0 if rank == 0 else 30.0)),
        "neither": should_stop(state, now - 30.0),
    }
    (tmp / f"rank{rank}.json").write_text(json.dumps(decisions))
    dist.destroy_process_group()


def test_workers_stop_together_when_only_one_is_out_of_time(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_decide, args=(tmp_path,), nprocs=2)
    decisions = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["rank 0 out of time"] for d in decisions] == [True, True]
    assert [d["neither"] for d in decisions] == [False, False]
