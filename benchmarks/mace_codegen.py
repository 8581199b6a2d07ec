"""How e3nn's code generation settings change MACE's build time and training step on CPU.

e3nn can reorder each generated module's einsums (``optimize_einsums``) and compile it with
TorchScript (``jit_script_fx``) when the module is built. For each of the four settings this
builds the project's MACE encoder and times training steps (energy, forces by autograd with
``create_graph``, a force loss, backward, Adam) on 4 LiPS frames at 5 Å, one torch thread,
the settings' steps interleaved round by round so that load from other jobs hits them alike.
Baseline: both off (eager). Run ``python benchmarks/mace_codegen.py [--size small|default]``.
Needs the ``mace`` extra. See benchmarks/README.md, "e3nn's generated code".
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIPS = ROOT.parent / "shared" / "datasets" / "lips" / "lips_devset.extxyz"
SIZES: dict[str, dict[str, Any]] = {
    "small": {"num_channels": 16, "max_ell": 2, "max_L": 0, "correlation": 2, "radial_mlp_dim": 32},
    "default": {},
}
SETTINGS = [(False, False), (False, True), (True, False), (True, True)]  # (script, einsums)


def step_s(encoder: Any, optimiser: Any, batch: Any) -> float:
    import torch

    start = time.perf_counter()
    batch.pos.requires_grad_(True)
    energy = encoder(batch).node.sum()
    (forces,) = torch.autograd.grad(energy, batch.pos, create_graph=True)
    loss = (forces**2).sum()
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="default")
    parser.add_argument("--rounds", type=int, default=6, help="2 steps per setting per round")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # TorchScript's notes while it scripts e3nn's code

    import ase.io
    import torch

    from matsci_ray.graphs.batching import RadiusGraphTransform, rows_to_pyg_batch
    from matsci_ray.inference import atoms_to_columns
    from matsci_ray.models import mace

    torch.set_num_threads(1)
    frames = list(ase.io.iread(str(LIPS), index=":4"))
    batch = rows_to_pyg_batch(RadiusGraphTransform(5.0)(atoms_to_columns(frames)), [])
    params = {**SIZES[args.size], "avg_num_neighbors": 25.0, "cutoff": 5.0}
    built, build_s = {}, {}
    for setting in SETTINGS:
        _build(mace, params, setting)  # warm-up: imports and e3nn's caches
        torch.manual_seed(0)
        start = time.perf_counter()
        encoder = _build(mace, params, setting)
        build_s[setting] = time.perf_counter() - start
        built[setting] = (encoder, torch.optim.Adam(encoder.parameters(), 1e-3))
    times: dict[tuple[bool, bool], list[float]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting, (encoder, optimiser) in built.items():
            times[setting] += [step_s(encoder, optimiser, batch) for _ in range(2)]
    eager = statistics.median(times[(False, False)][2:])
    print(f"| size {args.size} | build s | step ms (median) | ÷ eager |\n|---|--:|--:|--:|")
    for (script, einsums), values in times.items():
        median = statistics.median(values[2:])  # the first round is warm-up
        print(
            f"| script={script}, einsums={einsums} | {build_s[(script, einsums)]:.2f} | "
            f"{1e3 * median:.0f} | {median / eager:.2f} |"
        )


def _build(mace: Any, params: dict[str, Any], setting: tuple[bool, bool]) -> Any:
    """The encoder with its layers generated under ``setting`` (not the module's own)."""
    previous = mace.CODEGEN
    mace.CODEGEN = {"script": setting[0], "einsums": setting[1]}
    try:
        return mace.MACE(**params)
    finally:
        mace.CODEGEN = previous


if __name__ == "__main__":
    main()
