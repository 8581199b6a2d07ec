"""MACE through the project's pipeline (beyond the encoder contract, which covers it too).

Its layers compute what mace-torch's own model computes from the same weights; energies are
invariant and forces are finite differences at a setting with higher-degree hidden features
and body order; importing it leaves the process's ``torch.load`` safe; without the extra the
config fails in one line; and ``matsci-ray train`` trains it on LiPS, its checkpoint driving
the ASE calculator.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from matsci_ray.errors import ConfigError
from matsci_ray.models import build_encoder, model_spec
from tests.devices import DEVICES
from tests.samples import SAMPLES, ingest_in_process
from tests.test_encoder_contract import (
    CUTOFF,
    check_forces_match_finite_differences,
    check_invariance,
    crystals,
    to_batch,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        importlib.util.find_spec("mace") is None,
        reason="mace needs its extra: pip install -e '.[mace]'",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
# higher than the registry's small setting: vectors and quadrupoles in the hidden features,
# four-body products, three layers
DEEPER = {
    "num_channels": 4,
    "num_interactions": 3,
    "max_ell": 3,
    "max_L": 2,
    "correlation": 3,
    "num_radial": 6,
    "radial_mlp_dim": 8,
}


def mace_encoder(params: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("mace", CUTOFF, params)


def native_mace(params: dict, table: tuple[int, ...]) -> torch.nn.Module:
    """mace-torch's own model at ``params`` for the elements ``table`` (imported after ours:
    importing e3nn needs the setting our import makes for it)."""
    from e3nn import o3
    from mace.modules import MACE as NativeMACE
    from mace.modules import RealAgnosticResidualInteractionBlock

    c = params["num_channels"]
    return NativeMACE(
        r_max=CUTOFF,
        num_bessel=params["num_radial"],
        num_polynomial_cutoff=5,
        max_ell=params["max_ell"],
        interaction_cls=RealAgnosticResidualInteractionBlock,
        interaction_cls_first=RealAgnosticResidualInteractionBlock,
        num_interactions=params["num_interactions"],
        num_elements=len(table),
        hidden_irreps=o3.Irreps(f"{c}x0e + {c}x1o"),
        MLP_irreps=o3.Irreps("4x0e"),
        atomic_energies=np.zeros(len(table)),
        avg_num_neighbors=32.0,
        atomic_numbers=list(table),
        correlation=params["correlation"],
        gate=torch.nn.functional.silu,
        radial_MLP=[params["radial_mlp_dim"]] * 3,
    ).double()


@pytest.mark.filterwarnings("ignore:The TorchScript type system")  # mace-torch's own build
@pytest.mark.parametrize("elements", [None, [8, 11, 12, 14, 17]], ids=["all", "table"])
def test_the_layers_compute_what_mace_torchs_own_model_computes(
    elements: list[int] | None,
) -> None:
    """The same weights in ``mace.modules.MACE`` give the same scalar features per layer: the
    blocks are wired as mace-torch wires them, the edge vectors (direction, periodic shifts)
    are the ones it expects, and an element table (the crystals' O, Na, Mg, Si, Cl) gives
    each atom the one-hot column mace-torch's table gives it."""
    params = model_spec("mace").small_params()
    ours = mace_encoder({**params, "elements": elements}).double()
    native = native_mace(params, ours.elements)
    scale = math.sqrt(len(ours.elements))

    c = params["num_channels"]
    renamed = {"embedding": "node_embedding", "radial": "radial_embedding"}
    weights = {}
    for key, value in ours.layers.state_dict().items():
        block, rest = key.split(".", 1)
        if block != "spherical_harmonics":
            weights[f"{renamed.get(block, block)}.{rest}"] = value
    missing, unexpected = native.load_state_dict(weights, strict=False)
    assert unexpected == []
    # left out here: the readouts, reference energies and the model's own constants
    readout = ("readouts.", "atomic_energies_fn.")
    assert all(k.startswith(readout) or "." not in k for k in missing), missing
    # mace-torch reads the plain one-hot everywhere; ours feeds the embedding and the skip
    # connections sqrt(table size) times the one-hot: the same as their weights scaled by it
    with torch.no_grad():
        native.node_embedding.linear.weight.mul_(scale)
        for interaction in native.interactions:
            interaction.skip_tp.weight.mul_(scale)

    batch = to_batch(crystals())
    shifts = torch.einsum(
        "ej,ejk->ek", batch.cell_offsets, batch.cell[batch.batch[batch.edge_index[1]]]
    )
    data = {
        "positions": batch.pos.clone(),
        "cell": batch.cell,
        "batch": batch.batch,
        "ptr": batch.ptr,
        "edge_index": batch.edge_index,
        # theirs point from the neighbour to the centre: minus our vectors
        "shifts": -shifts,
        "node_attrs": torch.nn.functional.one_hot(
            torch.as_tensor([ours.elements.index(int(z)) for z in batch.z]), len(ours.elements)
        ).double(),
    }
    features = native(data, compute_force=False)["node_feats"].detach()
    # per layer, mace-torch concatenates all irreps (scalars first); ours keeps the scalars
    # 0e + 1o (max_L 1) in every layer but the last, which keeps only its scalars
    widths = [4 * c] * (params["num_interactions"] - 1) + [c]
    scalars = torch.cat([block[:, :c] for block in features.split(widths, dim=1)], dim=1)
    torch.testing.assert_close(ours(batch).node.detach(), scalars, rtol=1e-10, atol=1e-12)


def test_energy_is_invariant_and_forces_are_its_gradient_with_higher_order_features() -> None:
    """Rotating a periodic cell with its atoms (and translating, and choosing other images)
    leaves energies and every head's output unchanged and rotates the forces; forces through
    ``MatSciModel`` equal finite differences of its energy."""
    encoder = mace_encoder(DEEPER)
    check_invariance(encoder)
    check_forces_match_finite_differences(encoder)


def test_features_depend_on_geometry_not_only_on_elements() -> None:
    """One element at two different geometries gives different invariant features (carbon-24
    relies on this: its composition carries no information)."""
    from ase.build import bulk

    encoder = mace_encoder(model_spec("mace").small_params())
    compressed, stretched = bulk("C", "diamond", a=3.4), bulk("C", "diamond", a=3.9)
    out = encoder(to_batch([compressed, stretched], double=False)).graph.detach()
    assert not torch.allclose(out[0], out[1], rtol=1e-3, atol=1e-4)


def test_an_element_outside_the_table_is_refused_by_name() -> None:
    """A table without sodium: a batch holding it is a ValueError naming atomic number 11,
    not a wrong one-hot column; a table must hold distinct atomic numbers 1..118."""
    encoder = mace_encoder({**model_spec("mace").small_params(), "elements": [8, 12, 14, 17]})
    with pytest.raises(ValueError, match=r"atomic number\(s\) \[11\]"):
        encoder(to_batch(crystals(), double=False))
    for table in ([], [8, 8], [0, 8], [8, 119]):
        with pytest.raises(ConfigError, match="distinct atomic numbers"):
            build_encoder("mace", CUTOFF, {"elements": table})


def test_a_training_run_builds_mace_for_the_elements_of_its_data() -> None:
    """The driver fills ``model.params.elements`` in from every split of every data set's
    manifest; a manifest without element counts leaves it open; a table given in the config
    is kept if it holds every element of the data, and is a ConfigError naming the rest if
    not."""
    from matsci_ray.config import ExperimentConfig
    from matsci_ray.train.trainer import with_data_elements

    raw = {"name": "m", "tasks": ["lips-forces"], "data": {"root": "/nowhere"}}
    config = ExperimentConfig.model_validate({**raw, "model": {"name": "mace"}})
    splits = {
        "lips": {
            "train": {"element_counts": {"3": 5, "16": 2}},
            "val": {"element_counts": {"15": 1}},
        }
    }
    assert with_data_elements(config, splits).model.params["elements"] == [3, 15, 16]
    assert "elements" not in config.model.params  # a copy: the caller's config is unchanged

    def given(table: list[int]) -> ExperimentConfig:
        params = {"elements": table}
        return config.model_copy(
            update={"model": config.model.model_copy(update={"params": params})}
        )

    wider = given([3, 8, 15, 16])  # room for oxygen later
    assert with_data_elements(wider, splits) is wider
    with pytest.raises(ConfigError, match=r"atomic number\(s\) \[15, 16\], not in the table"):
        with_data_elements(given([3]), splits)
    assert with_data_elements(config, {"lips": {"train": {}}}) is config
    egnn = ExperimentConfig.model_validate(raw)  # no element table to fill in
    assert with_data_elements(egnn, splits) is egnn


def test_reset_parameters_reproduces_the_first_draws() -> None:
    """A seeded reset rebuilds mace-torch's initial weights exactly as the constructor drew
    them (e3nn's modules have no reset of their own)."""
    params = model_spec("mace").small_params()
    first = {k: v.clone() for k, v in mace_encoder(params).state_dict().items()}
    encoder = build_encoder("mace", CUTOFF, params)
    torch.manual_seed(0)
    encoder.reset_parameters()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, first[key], rtol=0, atol=0, msg=key)


def test_the_drivers_meta_device_check_builds_mace() -> None:
    """``prepare_run`` builds the encoder on torch's meta device; e3nn samples numbers while
    it builds a layer, so MACE's layers are built on the CPU there."""
    with torch.device("meta"):
        encoder = build_encoder("mace", CUTOFF, model_spec("mace").small_params())
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_importing_mace_leaves_torch_load_safe_and_stdout_clean(tmp_path: Path) -> None:
    """``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (every later ``torch.load``
    without ``weights_only`` would run pickled code) and prints to stdout; ours undoes both."""
    code = (
        "import os, torch\n"
        "from matsci_ray.models.mace import MACE\n"
        "assert 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD' not in os.environ\n"
        "class Payload:\n"
        "    def __reduce__(self):\n"
        "        return (print, ('pickled code ran',))\n"
        "torch.save(Payload(), 'payload.pt')\n"
        "try:\n"
        "    torch.load('payload.pt')\n"
        "except Exception as error:\n"
        "    raise SystemExit(3)\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 3, done.stderr[-2000:]  # torch refused the pickled call
    assert done.stdout == ""


def test_without_the_extra_the_config_fails_in_one_line(tmp_path: Path) -> None:
    """mace-torch missing (its import blocked): ``matsci-ray train`` exits 2 with one line
    naming the field and the install command, before Ray starts."""
    config = tmp_path / "mace.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "m",
                "tasks": ["lips-forces"],
                "data": {"root": str(tmp_path)},
                "model": {"name": "mace"},
            }
        )
    )
    code = (
        "import sys\n"
        "sys.modules['mace'] = None  # what an environment without mace-torch does on import\n"
        "from matsci_ray.cli.main import main\n"
        f"sys.exit(main(['train', {str(config)!r}]))\n"
    )
    done = _python(code, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "model.name" in lines[0]
    assert "needs the mace extra: pip install -e '.[mace]'" in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_matsci_ray_train_on_lips_and_the_checkpoint_drives_ase(
    tmp_path: Path, device: str
) -> None:
    """Two epochs of force training on LiPS through the CLI (Ray Train, a local Ray): the loss
    is finite and falls; the checkpoint loads into the ASE calculator, whose forces are minus
    the gradient of its energy. On a GPU the same command with ``run.use_gpu`` (one NCCL
    worker) and TF32 matmuls, and the calculator on the GPU."""
    from ase.io import read

    from matsci_ray.errors import StructureError
    from matsci_ray.inference import MatSciCalculator

    lips = SAMPLES / "lips" / "lips_devset.extxyz"
    if not lips.exists():
        pytest.skip(f"sample data not found at {lips}")
    root = ingest_in_process("lips", lips, tmp_path / "data")
    config = tmp_path / "lips-mace.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "lips-mace",
                "tasks": ["lips-forces"],
                "data": {"root": str(root), "cutoff": CUTOFF, "batch_size": 8},
                "model": {"name": "mace", "params": model_spec("mace").small_params()},
                "optim": {"lr": 5e-3, "epochs": 2, "scheduler": "none"},
                "run": {
                    "num_workers": 1,
                    "storage": str(tmp_path / "runs"),
                    "threads_per_worker": 1,
                },
            }
        )
    )
    command = [sys.executable, "-m", "matsci_ray.cli.main", "train", str(config)]
    command += ["--num-cpus", "2", "--set", "data.max_train_samples=32"]
    if device == "cuda":
        command += ["--set", "run.use_gpu=true", "--set", "run.precision=tf32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    history = [
        json.loads(line)
        for line in (tmp_path / "runs" / "lips-mace" / "history.jsonl").read_text().splitlines()
    ]
    losses = [row["train/lips-forces/loss"] for row in history]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert losses[1] < losses[0], losses

    checkpoint = next(line for line in done.stdout.splitlines() if line.startswith("checkpoint:"))
    atoms = read(lips, index=0)
    atoms.calc = MatSciCalculator(checkpoint.split(": ", 1)[1], device=device, dtype=torch.float64)
    # built for LiPS's Li, P and S, read from the data; a structure with iron is refused
    assert atoms.calc.predictor.elements == (3, 15, 16)
    iron = atoms.copy()
    iron.numbers[0] = 26
    iron.calc = atoms.calc
    with pytest.raises(StructureError, match="26, not among the elements the model was built"):
        iron.get_potential_energy()
    forces = atoms.get_forces()
    assert forces.shape == (len(atoms), 3) and np.isfinite(forces).all()
    step = 1e-4
    for atom, axis in [(0, 0), (40, 2)]:
        energies = []
        for sign in (1.0, -1.0):
            moved = atoms.copy()
            moved.calc = atoms.calc
            moved.positions[atom, axis] += sign * step
            energies.append(moved.get_potential_energy())
        numeric = -(energies[0] - energies[1]) / (2 * step)
        assert forces[atom, axis] == pytest.approx(numeric, rel=1e-4, abs=1e-6)
