"""``ExperimentConfig``: one experiment (data, model, loss, optimiser, run), and loading one
from YAML with ``--set`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictInt, ValidationInfo, field_validator

from matsci_ray.config.base import StrictModel, read_yaml, validate
from matsci_ray.config.model import ModelConfig
from matsci_ray.storage import LocationField, resolve
from matsci_ray.tasks.registry import TASKS, ForceLoss


class DataConfig(StrictModel):
    root: LocationField = Field(
        description="ingest output directory or URI (holds <dataset>/manifest.json)"
    )
    cutoff: float = Field(6.0, gt=0, description="neighbour cutoff, Å")
    max_neighbors: int | None = Field(None, gt=0)
    batch_size: int = Field(32, gt=0, description="structures per batch per worker")
    shuffle_buffer: int = Field(1024, ge=0, description="rows in the local shuffle buffer")
    preserve_order: bool = Field(
        True,
        description="Ray Data hands out blocks in plan order, so the run seed alone fixes "
        "the data order and a run repeats its figures; false lets a block that is ready "
        "first overtake (Ray's default: a little more throughput on large streamed data, "
        "a different order each run)",
    )
    val_split: Literal["val", "test"] = "val"
    val_keep_max_atoms: int = Field(
        100_000,
        ge=0,
        description="a worker's validation shard of at most this many atoms is collated "
        "once and kept in its memory (on its device) for later epochs instead of streamed "
        "every epoch (~2 kB per atom at 6 Å); 0: always streamed",
    )
    max_train_samples: int | None = Field(
        None,
        gt=0,
        description="train on a seeded uniform sample of this many rows per data set "
        "(the same rows every epoch): fixed budgets and smoke runs",
    )
    max_val_samples: int | None = Field(
        None,
        gt=0,
        description="validate on a seeded uniform sample of this many rows per data set "
        "(the same rows every epoch): a split too large to score each epoch",
    )
    task_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs per Ray Data read/graph task (fractional keeps small "
        "machines from starving the stream when trainers and trials hold part of a CPU)",
    )
    mix: Literal["proportional", "uniform", "temperature"] = Field(
        "proportional", description="how several data sets are interleaved"
    )
    mix_temperature: float = Field(2.0, gt=0, description="T of n_i^(1/T) mixing weights")
    cache_graphs: Literal["auto", "always", "never"] = Field(
        "auto",
        description="build each split's graphs once and keep them in Ray's object store "
        "(spilled to disk if need be) instead of rebuilding them every epoch; 'auto' caches "
        "splits of at most cache_max_atoms atoms",
    )
    cache_max_atoms: int = Field(
        1_000_000, gt=0, description="'auto' caching limit (~2.5 kB of graph per atom at 6 Å)"
    )
    max_atoms_per_batch: int | None = Field(
        None,
        gt=0,
        description="batches of at most this many atoms per worker (structures packed "
        "greedily in stream order; a larger structure trains alone) instead of batch_size "
        "structures, which is then only the rows read at a time. It is the bound at MAX "
        "workers: with fewer, each worker's share grows as batch_size's does, so a step "
        "sees about N x MAX atoms at any size; None: batches of batch_size",
    )


class LossConfig(StrictModel):
    energy_weight: float = Field(1.0, ge=0, description="energy term of force tasks")
    force_weight: float | None = Field(
        None, ge=0, description="force term of force tasks; default: each task's own"
    )
    force_loss: ForceLoss | None = Field(
        None,
        description="squared error of force components, or OCP's L2MAE: the mean Euclidean "
        "norm of each atom's force error, whose gradient per atom is bounded (an OC20 frame "
        "with 90 eV/Å forces cannot dominate a step); default: each task's own (L2MAE for "
        "OC20, squared errors for LiPS)",
    )
    stress_weight: float = Field(
        0.0,
        ge=0,
        description="stress term of force tasks (squared Voigt component errors in units of "
        "the data set's stress RMS), on structures that carry a stress; 0: off",
    )
    task_weights: dict[str, float] = Field(default_factory=dict)
    combine: Literal["additive", "pcgrad"] = "additive"


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(20, gt=0)
    max_minutes: float | None = Field(None, gt=0, description="stop after this wall time")
    max_steps_per_epoch: int | None = Field(
        None,
        gt=0,
        description="end each epoch (validate, checkpoint, report) after this many optimiser "
        "steps: a corpus whose full pass is hours; each epoch starts a new pass in its own "
        "file order, so successive epochs train on different rows. None: whole passes",
    )
    grad_clip: float | None = Field(10.0, gt=0)
    scheduler: Literal["cosine", "plateau", "none"] = Field(
        "cosine",
        description="cosine: per optimiser step from lr down to 0.02 lr at the last epoch; "
        "plateau: lr times plateau_factor after plateau_patience epochs without gain in the "
        "first task's validation metric (not below 0.02 lr); none: constant",
    )
    warmup_steps: int = Field(
        0, ge=0, description="optimiser steps of linear warm-up to lr (before any scheduler)"
    )
    plateau_factor: float = Field(
        0.5, gt=0, lt=1, description="plateau: what the lr is multiplied by at each cut"
    )
    plateau_patience: int = Field(
        3,
        gt=0,
        description="plateau: epochs in a row without gain (counted after warm-up) before a cut",
    )
    early_stopping_patience: int | None = Field(None, gt=0, description="epochs without gain")
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="exponential moving average of the weights, updated after every "
        "optimiser step (typical 0.99-0.999); validation, checkpoints' weights and what "
        "predicts from them are the average. None: off",
    )

    @field_validator("early_stopping_patience")
    @classmethod
    def _stops_after_a_cut(cls, patience: int | None, info: ValidationInfo) -> int | None:
        """With plateau, stopping no later than the first cut would make plateau a no-op."""
        plateau = info.data.get("plateau_patience")
        if patience is None or info.data.get("scheduler") != "plateau" or plateau is None:
            return patience
        if patience <= plateau:
            raise ValueError(
                f"must exceed optim.plateau_patience ({plateau}) with the plateau scheduler, "
                "or the run stops before its learning rate is ever lowered"
            )
        return patience


class RunConfig(StrictModel):
    num_workers: StrictInt | tuple[StrictInt, StrictInt] = Field(
        2,
        description="Ray Train workers: N (a fixed size; a lost worker is waited for), or "
        "[MIN, MAX] (elastic: starts with what is free, at least MIN, goes on with fewer "
        "when a node is lost and grows back to MAX when nodes join; the global batch stays "
        "data.batch_size x MAX)",
    )
    placement: Literal["pack", "spread"] = Field(
        "pack",
        description="pack: workers on as few nodes as hold them; spread: on different nodes "
        "where there are enough (Ray's PACK and SPREAD placement strategies)",
    )
    elastic_resize_interval_s: float = Field(
        60.0,
        ge=0,
        description="elastic runs: how often a running run checks whether more workers fit "
        "(growing restarts the workers from the latest checkpoint)",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        gt=0,
        description="also checkpoint every N optimiser steps (counted over the whole run), "
        "besides every epoch; a restart or --resume continues the epoch from there",
    )
    cpus_per_worker: float = Field(0.5, gt=0)
    use_gpu: bool = False
    storage: LocationField = Field(Path("runs/results"), description="local path or URI")
    max_failures: int = Field(
        1, ge=0, description="restarts after a worker dies (config and data errors: none)"
    )
    resource_timeout_s: float = Field(
        600.0,
        ge=0,
        description="how long a run waits for its workers' CPUs/GPUs to come free (other jobs, "
        "an autoscaler adding nodes) before it gives up; a request no node can ever hold "
        "fails at once",
    )
    worker_start_timeout_s: float = Field(
        60.0,
        gt=0,
        description="how long Ray Train gives a group of workers to start before it decides "
        "again from the resources free then (Ray's default 60 s). A restart right after a "
        "node is lost can ask for that node's CPUs, still counted until the cluster marks it "
        "dead, and waits this long before an elastic run goes on with fewer workers",
    )
    seed: int = 42
    threads_per_worker: int | None = Field(None, gt=0, description="torch intra-op threads")
    precision: Literal["fp32", "bf16", "tf32"] = Field(
        "fp32",
        description="training arithmetic: fp32; bf16, the encoder's forward under autocast "
        "(CPU and CUDA; geometry, heads and force/stress derivatives stay fp32); tf32, CUDA "
        "matmuls and convolutions in TF32 (no effect on CPU). Validation and inference: fp32",
    )
    compile: bool = Field(
        False,
        description="torch.compile the encoder for training; where it cannot (force tasks "
        "need a double backward), the run trains uncompiled and says why in one warning",
    )
    fail_at_epoch: int | None = Field(None, description="testing: kill rank 0 once at this epoch")
    fail_at_step: int | None = Field(
        None, description="testing: kill rank 0 once after this step's step checkpoint"
    )
    hold_shrunk_while_file_exists: Path | None = Field(
        None,
        description="testing: an elastic run on fewer than MAX workers waits after each epoch "
        "while this file exists, so a test can add a node before the run ends",
    )

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, workers: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (workers, workers) if isinstance(workers, int) else workers
        if low < 1:
            raise ValueError("must be at least 1 worker (a count N, or a range [MIN, MAX])")
        if low > high:
            raise ValueError(f"MIN {low} exceeds MAX {high} in [MIN, MAX]")
        return workers

    @property
    def min_workers(self) -> int:
        """The fewest workers a run trains with (``num_workers`` when it is a count)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers a run trains with: the size the global batch is defined at."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)


class ExperimentConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    tasks: list[str] = Field(min_length=1)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {sorted(TASKS)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks repeat: {tasks}")
        return tasks

    @property
    def datasets(self) -> list[str]:
        """Data sets the tasks draw on, in task order, each once."""
        return list(dict.fromkeys(TASKS[t].dataset for t in self.tasks))


def resolve_paths(config: ExperimentConfig) -> None:
    config.data.root = resolve(config.data.root)
    config.run.storage = resolve(config.run.storage)


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; ``overrides`` are dotted keys (``optim.lr``)."""
    path = Path(path)
    raw = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    config = validate(ExperimentConfig, raw, path)
    resolve_paths(config)
    return config


def dump_config(config: ExperimentConfig) -> dict[str, Any]:
    """JSON-able form stored in checkpoints and reports."""
    return config.model_dump(mode="json")


# --- studies: families of experiments run as Ray Tune experiments --------------------------
