"""One MACE training step, matsci-ray's against mace-torch's own, and what each difference costs.

In one process, one torch thread, on the same LiPS batches (4 frames each, 5 Å): mace-torch's
``take_step`` (its MACE, weighted energy + forces loss, AMSGrad Adam, gradient clipping) is the
baseline; matsci-ray's step (MACE encoder, energy head, the task's loss, AdamW, clipping, the
epoch's metric sums) runs under each combination of the three things that differ between
them: e3nn's generated code (reordered einsums alone, or with TorchScript as mace-torch builds
it), the element table (all 119 atomic numbers, or the data's Li, P, S as mace-torch's) and the
energy head's width (128, the default, or 16 as mace-torch's read-out). The hyperparameters are
those of ``benchmarks/mace_native.py``. Steps are interleaved batch by batch across variants,
so that load from other jobs hits them alike; each figure is the median step time and its ratio
to mace-torch's in the same run.

Run ``python benchmarks/mace_step.py`` (~2 minutes on 2 cores; ``--rounds N``). Needs the
``mace`` extra. See benchmarks/README.md, "One MACE training step".
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # mace_native.py, evidence.py
from mace_native import CUTOFF, FORCE_WEIGHT, LR, MACE, SAMPLES, SEED, export_xyz, mean_neighbours

ROOT = Path(__file__).resolve().parents[1]
BATCH, BATCHES = 4, 12
VARIANTS = list(itertools.product(("einsums", "both"), ("all", "data"), (128, 16)))


def ingest(tmp: Path) -> tuple[Path, Path, float]:
    """LiPS ingested as the native benchmark ingests it; its train split also as XYZ."""
    from matsci_ray.data.ingest import run_ingest
    from matsci_ray.data.shards import IngestOptions
    from matsci_ray.data.splits import SplitConfig

    root = tmp / "data"
    split = IngestOptions(source="lips", split=SplitConfig((0.8, 0.2, 0.0), seed=SEED))
    run_ingest("lips", [SAMPLES / "lips/lips_devset.extxyz"], root, split, progress=False)
    xyz = tmp / "train.xyz"
    export_xyz(root, "train", xyz)
    return root, xyz, mean_neighbours(xyz)


def ours(root: Path, tmp: Path, avg: float, variant: tuple[str, str, int]) -> tuple[Callable, list]:
    """matsci-ray's step under ``variant`` and its batches (the first of the train split)."""
    import torch
    from evidence import experiment

    from matsci_ray.config import ExperimentConfig
    from matsci_ray.graphs.collate import batch_targets, collate
    from matsci_ray.models import mace
    from matsci_ray.potential import MatSciModel
    from matsci_ray.train.metrics import MetricSums, task_losses
    from matsci_ray.train.trainer import graph_dataset, train_summaries, with_data_elements

    codegen, table, head = variant
    raw = experiment(
        "step",
        "lips-forces",
        root,
        tmp,
        model={"name": "mace", "params": {**MACE, "avg_num_neighbors": avg}, "head_hidden": head},
        data={"cutoff": CUTOFF, "batch_size": BATCH},
        loss={"force_weight": FORCE_WEIGHT},
    )
    config = ExperimentConfig.model_validate(raw)
    if table == "data":
        config = with_data_elements(config)
    previous, mace.CODEGEN = mace.CODEGEN, {"script": codegen == "both", "einsums": True}
    try:
        torch.manual_seed(SEED)
        model = MatSciModel.from_config(config)
    finally:
        mace.CODEGEN = previous
    model.fit_normalisation(train_summaries(config))
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR)
    targets = batch_targets(model.tasks.values())
    rows = graph_dataset(config, "lips", "train", shuffle_files=False).iter_batches(
        batch_size=BATCH, batch_format="numpy"
    )
    batches = [collate(r, targets, model.datasets) for r in itertools.islice(rows, BATCHES)]

    def step(batch: Any) -> None:
        preds = model(batch)
        losses = task_losses(model, preds, batch, config.loss)
        optimiser.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimiser.step()
        sums = MetricSums(model)  # what the training loop adds up after every step
        for name, loss in losses.items():
            sums.add_loss(name, float(loss.detach()), batch.num_graphs)
        sums.update(preds, batch)

    return step, batches


def native(xyz: Path, avg: float) -> tuple[Callable, list]:
    """mace-torch's own step as ``mace_run_train`` takes it, and its batches of the same
    frames in the same order."""
    import ase.io
    import numpy as np
    import torch

    importlib.import_module("matsci_ray.models.mace")  # imports e3nn the way its load needs
    from e3nn import o3
    from mace import data, modules, tools
    from mace.tools.torch_geometric.dataloader import DataLoader
    from mace.tools.train import take_step

    frames = ase.io.read(str(xyz), index=":")
    z_table = tools.AtomicNumberTable(sorted({int(z) for a in frames for z in a.numbers}))
    keys = data.KeySpecification(
        info_keys={"energy": "REF_energy"}, arrays_keys={"forces": "REF_forces"}
    )
    graphs = [
        data.AtomicData.from_config(
            data.config_from_atoms(a, key_specification=keys), z_table=z_table, cutoff=CUTOFF
        )
        for a in frames[: BATCH * BATCHES]
    ]
    residual = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    torch.manual_seed(SEED)
    model = modules.MACE(
        r_max=CUTOFF,
        num_bessel=MACE["num_radial"],
        num_polynomial_cutoff=MACE["num_cutoff_basis"],
        max_ell=MACE["max_ell"],
        interaction_cls=residual,
        interaction_cls_first=residual,
        num_interactions=MACE["num_interactions"],
        num_elements=len(z_table),
        hidden_irreps=o3.Irreps(f"{MACE['num_channels']}x0e"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(z_table)),
        avg_num_neighbors=avg,
        atomic_numbers=z_table.zs,
        correlation=MACE["correlation"],
        gate=torch.nn.functional.silu,
        radial_MLP=[MACE["radial_mlp_dim"]] * 3,
    )
    loss = modules.WeightedEnergyForcesLoss(energy_weight=1.0, forces_weight=FORCE_WEIGHT)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR, amsgrad=True)
    outputs = {"forces": True, "virials": False, "stress": False}

    def step(batch: Any) -> None:
        take_step(model, loss, batch, optimiser, None, outputs, 10.0, torch.device("cpu"))

    return step, list(DataLoader(graphs, batch_size=BATCH, shuffle=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="passes over the batches")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mace_step.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # TorchScript's notes while mace-torch scripts its code

    import ray
    import torch

    from matsci_ray.ray_env import init_ray

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mstep", dir="/tmp") as name:
        tmp = Path(name)
        init_ray(num_cpus=1, temp_dir=tmp / "ray")
        root, xyz, avg = ingest(tmp)
        steps = {"mace-torch": native(xyz, avg)}
        for variant in VARIANTS:
            steps["/".join(map(str, variant))] = ours(root, tmp, avg, variant)
        ray.shutdown()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for index in range(BATCHES):
            for name, (step, batches) in steps.items():
                start = time.perf_counter()
                step(batches[index])
                if round_:
                    times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
                "command": " ".join(["python", *sys.argv]),
                "steps_per_variant": len(times["mace-torch"]),
                "median_s": medians,
                "ratio_to_mace_torch": {k: v / medians["mace-torch"] for k, v in medians.items()},
            },
            indent=1,
        )
        + "\n"
    )
    print(table(medians))


def table(medians: dict[str, float]) -> str:
    baseline = medians["mace-torch"]
    lines = [
        "| step | codegen | elements | head width | median ms | ÷ mace-torch |",
        "|---|---|---|--:|--:|--:|",
        f"| mace-torch `take_step` | both | data | 16 | {1e3 * baseline:.1f} | 1.00 |",
    ]
    for codegen, table_, head in VARIANTS:
        median = medians[f"{codegen}/{table_}/{head}"]
        lines.append(
            f"| matsci-ray | {codegen} | {table_} | {head} | {1e3 * median:.1f} | "
            f"{median / baseline:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
