"""The model and data set registries: every list derives from them, they agree with the
readers and the tasks, and another package extends them through an entry point alone.

The last test is the issue's: a toy encoder, registered in one place (its package's entry
point), is trained by ``matsci-ray train`` and swept by ``matsci-ray study``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from matsci_ray.config import (
    ExperimentConfig,
    StudyConfig,
    check_encoder_params,
    load_config,
    load_study,
)
from matsci_ray.data.readers import READERS, reader_class
from matsci_ray.data.registry import DATASETS, DatasetSpec, dataset_names, paper_pairs
from matsci_ray.errors import ConfigError
from matsci_ray.models import MODELS, encoder_signature, model_names, model_spec
from matsci_ray.tasks.registry import TASKS
from tests.conftest import no_local_ray
from tests.samples import ingest_in_process

# A plugin package, as another project would ship it: an encoder module, and a spec module
# that names it without importing it (the registry imports the encoder on first use).
TOY_ENCODER = '''
import torch
from torch import nn

from matsci_ray.models.base import Encoder, EncoderOutput
from matsci_ray.models.blocks import (
    CosineCutoff, GaussianRBF, edge_geometry, graph_index, readout, reset_children,
)


class Toy(Encoder):
    """Continuous-filter convolutions: just enough of an encoder to learn something."""

    def __init__(self, *, dim: int = 16, layers: int = 1, cutoff: float = 5.0) -> None:
        super().__init__()
        self.node_dim, self.graph_dim, self.cutoff = dim, 2 * dim, float(cutoff)
        self.embed = nn.Embedding(119, dim)
        self.rbf = GaussianRBF(8, stop=cutoff)
        self.envelope = CosineCutoff(cutoff)
        self.filters = nn.ModuleList(nn.Linear(8, dim) for _ in range(layers))

    def reset_parameters(self) -> None:
        reset_children(self)

    def forward(self, batch) -> EncoderOutput:
        index, num_graphs = graph_index(batch)
        _, dist = edge_geometry(batch, index)
        src, dst = batch.edge_index
        h = self.embed(batch.z)
        weight = self.envelope(dist).unsqueeze(-1)
        for conv in self.filters:
            message = conv(self.rbf(dist)) * h[src] * weight
            h = h + torch.tanh(torch.zeros_like(h).index_add(0, dst, message))
        return EncoderOutput(h, readout(h, index, num_graphs))
'''
TOY_SPECS = """
from matsci_ray.data.registry import DatasetSpec
from matsci_ray.models.registry import ModelSpec

TOY = ModelSpec("toy", "toy_encoder:Toy", width="dim", depth="layers", small={"dim": 8})
# a width the encoder does not take: refused when the model is first used
BAD = ModelSpec("bad", "toy_encoder:Toy", width="hidden", depth="layers")
# a data set read by the LiPS reader, under its own name; and one claiming LiPS's task
TOY_SET = DatasetSpec("toy-set", "matsci_ray.data.readers.lips:LiPSReader", energy_task=None)
THIEF = DatasetSpec("thief", "matsci_ray.data.readers.lips:LiPSReader", energy_task="lips-forces")
"""
ENTRY_POINTS = """
[matsci_ray.models]
toy = toy_specs:TOY
bad = toy_specs:BAD
broken = no_such_module:SPEC

[matsci_ray.datasets]
toy-set = toy_specs:TOY_SET
thief = toy_specs:THIEF
"""


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    """A directory that, on ``sys.path`` or ``PYTHONPATH``, installs the toy plugin package:
    its modules and the ``*.dist-info`` that importlib.metadata reads entry points from."""
    root = tmp_path / "site"
    dist = root / "toy_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (root / "toy_encoder.py").write_text(TOY_ENCODER)
    (root / "toy_specs.py").write_text(TOY_SPECS)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def _cli(args: list[str], plugin: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``matsci-ray ARGS`` in a fresh process with the plugin installed; a short Ray temp dir
    (socket paths must stay under 108 characters)."""
    path = os.pathsep.join(p for p in (str(plugin), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "RAY_TMPDIR": tempfile.mkdtemp(dir="/tmp")}
    command = [sys.executable, "-m", "matsci_ray.cli.main", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _experiment(root: Path, storage: Path, name: str, model: dict, epochs: int = 2) -> dict:
    return {
        "name": name,
        "tasks": ["mp-band-gap"],
        "data": {"root": str(root), "cutoff": 4.0, "batch_size": 32, "max_train_samples": 64},
        "model": model,
        "optim": {"lr": 3e-3, "epochs": epochs, "scheduler": "none"},
        "run": {
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "storage": str(storage),
            "threads_per_worker": 1,
        },
    }


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# --- the built-in registries agree with the readers, tasks and encoders -----------------------


def test_every_source_reads_into_the_data_set_it_is_registered_as() -> None:
    assert list(READERS) == [*dataset_names(), "generic"]
    for name in dataset_names():
        reader = reader_class(name)
        assert (reader.name, reader.dataset) == (name, name)


def test_every_task_draws_on_a_registered_data_set_and_energy_tasks_are_their_own() -> None:
    assert {task.dataset for task in TASKS.values()} <= set(dataset_names())
    for spec in DATASETS.specs().values():
        assert spec.energy_task is None or TASKS[spec.energy_task].dataset == spec.name


def test_the_papers_data_set_pairs() -> None:
    assert paper_pairs() == [
        ("oc20-s2ef", "materials-project"),
        ("oc20-s2ef", "lips"),
        ("oc20-is2re", "materials-project"),
        ("materials-project", "lips"),
    ]


@pytest.mark.parametrize("name", model_names())
def test_every_model_spec_names_arguments_its_encoder_takes(name: str) -> None:
    spec = model_spec(name)
    takes = {p.name for p in encoder_signature(name)}
    assert {spec.width, spec.depth} <= takes
    assert check_encoder_params(name, spec.small_params()) == dict(spec.small)


def test_config_refuses_an_unknown_model_naming_the_choices(tmp_path: Path) -> None:
    raw = _experiment(tmp_path, tmp_path, "typo", {"name": "egn", "params": {"x": 1}})
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path / "exp.yaml", raw))
    assert str(error.value) == (
        f"{tmp_path / 'exp.yaml'}: model.name: unknown model 'egn'; did you mean egnn? "
        f"choose from {', '.join(MODELS.names())}"  # every family: cdvae is a model.name too
    )
    study = {"name": "s", "family": "single-task", "base": {**raw, "model": {}}, "models": ["x"]}
    with pytest.raises(ConfigError, match=r"models\.0: unknown model 'x'; choose from egnn"):
        load_study(_write(tmp_path / "study.yaml", study))


def test_config_schema_lists_the_registered_models() -> None:
    """Every model a config accepts, generative ones included (cdvae is a valid model.name)."""
    model = ExperimentConfig.model_json_schema()["$defs"]["ModelConfig"]["properties"]["name"]
    assert model["enum"] == MODELS.names()
    assert "cdvae" in model["enum"] and "cdvae" not in model_names()
    assert StudyConfig.model_json_schema()["properties"]["models"]["items"]["enum"] == (
        MODELS.names()
    )


# --- plugins -----------------------------------------------------------------------------------


def test_plugins_register_after_the_built_ins_and_broken_ones_say_why(
    plugin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(plugin))
    models, datasets = MODELS.fresh(), DATASETS.fresh()
    assert models.names() == [*MODELS.names(), "bad", "toy"]  # plugins by name
    assert models.get("toy").width == "dim"
    assert "its plugin did not load: no_such_module:SPEC: " in models.unknown("broken")
    assert datasets.names() == [*DATASETS.names(), "toy-set"]
    assert "energy task 'lips-forces' is not one of its tasks" in datasets.unknown("thief")
    assert isinstance(datasets.get("toy-set"), DatasetSpec)


def test_a_plugin_whose_width_is_no_argument_fails_in_one_line(
    plugin: Path, tmp_path: Path
) -> None:
    config = _write(
        tmp_path / "bad.yaml", _experiment(tmp_path, tmp_path / "runs", "bad", {"name": "bad"})
    )
    done = _cli(["train", str(config)], plugin, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"matsci-ray train: error: {config}: model.name: model bad: width 'hidden' is not a "
        "keyword argument of toy_encoder:Toy; it takes dim, layers"
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a local Ray of its own, on a shared 2-core machine
def test_a_toy_encoder_registered_in_one_place_trains_and_sweeps(
    plugin: Path, samples: Path, tmp_path: Path
) -> None:
    """The plugin's entry point is the only place the toy is named: config validation, the
    Ray Train workers and the sweep's width and depth all find it there. One sweep (its
    trials are Ray Train runs) checks all three: a separate ``train`` would start a second
    Ray to show nothing more."""
    root = ingest_in_process(
        "materials-project", samples / "materials_project" / "summary_docs.jsonl", tmp_path / "data"
    )
    toy = {"name": "toy", "params": {"dim": 8}, "head_hidden": 16}
    sweep = {  # one trial: test_demo shows Optuna sampling two
        "name": "toy-sweep",
        "family": "sweep",
        "base": _experiment(root, tmp_path / "studies", "sw", toy),
        "sweep": {"num_samples": 1, "width": [16], "depth": [2], "grace_period": 1},
    }
    study = _write(tmp_path / "study.yaml", sweep)
    with no_local_ray():
        swept = _cli(["study", str(study), "--num-cpus", "2"], plugin, timeout=600)
        assert swept.returncode == 0, swept.stderr[-3000:]

    (trial,) = [json.loads(x) for x in (tmp_path / "studies/toy-sweep/trials.jsonl").open()]
    assert trial["error"] is None and trial["model"] == "toy"
    # the sweep's width and depth reached the toy's own parameters (8 and 1 in the base)
    assert (trial["params"]["dim"], trial["params"]["layers"]) == (16, 2)
    assert math.isfinite(trial["metrics"]["val/mp-band-gap/mse"])
    history = [json.loads(x) for x in (Path(trial["run_dir"]) / "history.jsonl").open()]
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(math.isfinite(row["train/mp-band-gap/loss"]) for row in history)
    assert history[-1]["train/mp-band-gap/loss"] < history[0]["train/mp-band-gap/loss"]
