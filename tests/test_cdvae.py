"""CDVAE (model.name: cdvae) without Ray: registry, objective, sampler, metrics, commands.

Data: the first rows of the shared perov-5 CSVs, ingested in process (val rows as the train
split). Ray Train end to end is in tests/test_cdvae_ray.py.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from matsci_ray.cli.main import main
from matsci_ray.errors import ConfigError
from matsci_ray.generative.data import crystals, crystals_of, graph_batches, normalisation_stats
from matsci_ray.generative.lattice import min_image, to_fractional
from matsci_ray.generative.metrics import (
    composition_valid,
    coverage,
    match,
    property_emd,
    random_crystals,
    structure_valid,
    training_sample,
    validity,
)
from matsci_ray.generative.model import CDVAE
from matsci_ray.generative.objective import Objective
from matsci_ray.generative.sampling import Crystals, Langevin, generate, reconstruct_positions
from matsci_ray.models import build_encoder, model_names, model_spec
from tests.devices import DEVICES

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = "formation_energy_per_atom"
TINY = {"hidden_dim": 16, "num_layers": 1, "latent_dim": 8, "num_noise_levels": 4}


def ingest_subset(samples: Path, root: Path, name: str, rows: dict[str, tuple[str, int]]) -> Path:
    """``{split: (source file stem, rows)}`` of ``samples/cdvae/<name>``, the first rows of
    each written to a CSV named by its split and ingested in process into ``root``."""
    from matsci_ray.data.manifest import build_manifest, write_manifest
    from matsci_ray.data.readers import get_reader
    from matsci_ray.data.shards import IngestOptions, ingest_unit

    csv.field_size_limit(sys.maxsize)
    source = {"perov_5": "perov-5", "carbon_24": "carbon-24"}[name]
    files = []
    for split, (stem, count) in rows.items():
        with open(samples / "cdvae" / name / f"{stem}.csv", newline="") as handle:
            head = [row for _, row in zip(range(count + 1), csv.reader(handle), strict=False)]
        files.append(root / "csv" / f"{split}.csv")
        files[-1].parent.mkdir(parents=True, exist_ok=True)
        with open(files[-1], "w", newline="") as handle:
            csv.writer(handle).writerows(head)
    options, reader = IngestOptions(source=source), get_reader(source)
    sidecars = [
        ingest_unit(unit, root / reader.dataset, options, "test")
        for file in files
        for unit in reader.plan(file)
    ]
    inputs = [{"file": str(f)} for f in files]
    write_manifest(root, reader.dataset, build_manifest(reader.dataset, options, inputs, sidecars))
    return root


@pytest.fixture(scope="module")
def perov(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("perov")
    return ingest_subset(samples, root, "perov_5", {"train": ("val", 24), "test": ("test", 12)})


def tiny_model(root: Path, seed: int = 0) -> CDVAE:
    torch.manual_seed(seed)
    model = build_encoder("cdvae", 6.0, {**TINY, "max_atoms": 8})
    assert isinstance(model, CDVAE)
    model.fit_normalisation(normalisation_stats(root, "perov-5", TARGET))
    return model


def objective_before_and_after(objective: Objective, batch: object) -> tuple[float, float]:
    """The objective on the same held-out noise draws (no sampling luck) before and after 40
    Adam steps on ``batch``."""

    def held_out_noise() -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1234)
            return float(np.mean([float(objective(batch)["loss"]) for _ in range(4)]))

    before = held_out_noise()
    optimizer = torch.optim.Adam(objective.parameters(), lr=3e-3)
    for _ in range(40):
        loss = objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, held_out_noise()


def test_cdvae_is_a_generative_registry_entry() -> None:
    assert "cdvae" not in model_names()  # predictive consumers (demo, studies) never see it
    assert model_names("generative") == ["cdvae"]
    spec = model_spec("cdvae")
    assert spec.family == "generative" and spec.width == "hidden_dim"
    with pytest.raises(ConfigError, match="not a predictive encoder"):
        build_encoder("cdvae", 6.0, {"encoder": "cdvae"})


def test_config_checks_cdvae_params(tmp_path: Path) -> None:
    from matsci_ray.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "name: c\ntasks: [perov5-formation-energy]\ndata: {root: d}\n"
        "model: {name: cdvae, params: {latent_dims: 8}}\n"
    )
    with pytest.raises(ConfigError, match="did you mean latent_dim"):
        load_config(path)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_decreases_on_a_tiny_set(perov: Path, device: str) -> None:
    model = tiny_model(perov).to(device)
    batch = next(graph_batches(perov, "perov-5", "train", 6.0, 16, targets=(TARGET,)))
    before, after = objective_before_and_after(Objective(model, TARGET), batch.to(device))
    assert after < 0.7 * before


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_yields_finite_crystals_with_positive_volume(perov: Path, device: str) -> None:
    model = tiny_model(perov).eval().to(device)
    made = generate(model, 6, Langevin(steps_per_level=2), seed=1, batch_size=4)
    assert len(made) == 6
    for numbers, frac, cell in made:
        assert len(numbers) >= 1 and ((numbers >= 1) & (numbers <= 100)).all()
        assert np.isfinite(frac).all() and ((frac >= 0) & (frac < 1)).all()
        assert np.isfinite(cell).all() and np.linalg.det(cell) > 0
    if device == "cpu":  # a GPU's scatter-adds sum in any order: a rerun differs in rounding
        again = generate(model, 6, Langevin(steps_per_level=2), seed=1, batch_size=4)
        assert all(np.array_equal(a, b) for a, b in zip(made.frac, again.frac, strict=True))


def test_decoder_only_reconstruction_keeps_each_crystals_atoms_and_cell(perov: Path) -> None:
    """Only positions are sampled: the atoms and the lattice (up to its rotation into the
    decoder's canonical orientation) are the test crystals' own, so the random-position
    baseline is the fair comparison."""
    model = tiny_model(perov).eval()
    batch = next(graph_batches(perov, "perov-5", "test", 6.0, 8))
    made = reconstruct_positions(model, batch, Langevin(steps_per_level=2), torch.Generator())
    reference = crystals_of(batch)
    assert len(made) == batch.num_graphs
    for (z, frac, cell), (z0, _, cell0) in zip(made, reference, strict=True):
        assert np.array_equal(z, z0)
        assert np.allclose(cell @ cell.T, cell0 @ cell0.T, atol=1e-4)  # same lengths, angles
        assert np.isfinite(frac).all() and ((frac >= 0) & (frac < 1)).all()


def test_reconstruction_metrics_on_known_cases(perov: Path) -> None:
    reference = crystals(perov, "perov-5", "test")
    itself = match(reference, reference)
    assert itself["match_rate"] == 1.0 and itself["rmse"] == pytest.approx(0.0, abs=1e-9)
    scrambled = random_crystals(reference, len(reference), seed=0)
    assert match(scrambled, reference)["match_rate"] <= 0.25


def test_validity_on_known_cases(perov: Path) -> None:
    reference = crystals(perov, "perov-5", "test")
    assert validity(reference)["valid_structure"] == 1.0
    cell = np.eye(3) * 4.0
    assert not structure_valid(np.array([8, 8]), np.array([[0, 0, 0], [0.05, 0, 0]]), cell)
    assert not structure_valid(np.array([6]), np.zeros((1, 3)), np.eye(3) * 0.4)  # own image
    assert composition_valid(np.array([11, 17])) and composition_valid(np.array([6, 6, 6]))
    assert not composition_valid(np.array([11, 11, 17]))  # Na2Cl is not charge-neutral


def test_coverage_and_property_statistics_on_known_cases(perov: Path) -> None:
    reference = crystals(perov, "perov-5", "test")
    itself = coverage(reference, reference)
    assert itself == {"cov_recall": 1.0, "cov_precision": 1.0}
    assert property_emd(reference, reference) == {"density_emd": 0.0, "elements_emd": 0.0}
    single = Crystals([np.array([6])], [np.zeros((1, 3))], np.eye(3)[None] * 1.5)
    far = coverage(single, reference)
    assert far["cov_recall"] <= 1 / len(reference)
    assert property_emd(single, reference)["elements_emd"] > 1.0


def test_coverage_separates_training_crystals_from_the_random_baseline(
    samples: Path, tmp_path: Path
) -> None:
    """The two references a model's coverage is read between, on 100 perov-5 test crystals:
    200 real crystals of the same distribution (the ceiling) cover most of them, random
    positions in those crystals' cells (the floor) almost none."""
    root = ingest_subset(
        samples, tmp_path, "perov_5", {"train": ("val", 200), "test": ("test", 100)}
    )
    reference, training = crystals(root, "perov-5", "test"), crystals(root, "perov-5", "train")
    ceiling = coverage(training_sample(training, 200, seed=0), reference)
    floor = coverage(random_crystals(training, 200, seed=0), reference)
    assert ceiling["cov_recall"] > 0.7 and ceiling["cov_precision"] > 0.5
    assert floor["cov_recall"] < 0.2 and floor["cov_precision"] < 0.1


def test_generate_refuses_a_predictive_checkpoint(
    perov: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from matsci_ray.train.checkpoint import save_checkpoint
    from tests.samples import tiny_model as tiny_predictive

    model, config = tiny_predictive("egnn-run", perov, ["perov5-formation-energy"])
    save_checkpoint(tmp_path, model, config)
    out = tmp_path / "gen.extxyz"
    assert main(["generate", str(tmp_path), "-n", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "predictive model" in err and "cdvae" in err
    assert not out.exists()


def test_report_has_a_generative_section(tmp_path: Path) -> None:
    from matsci_ray.report import Trial
    from matsci_ray.report.generative import generative_sections, write_metrics

    run = Trial("cdvae-run", "single-task", ["perov5-formation-energy"], ["perov-5"], "cdvae")
    assert generative_sections([run]) == []  # no evaluated generative run: no section
    run.run_dir = tmp_path
    results = {
        "model": {"match_rate": 0.5},
        "decoder_only": {"match_rate": 0.75},
        "baseline": {"match_rate": 0.0},
        "published": {},
    }
    write_metrics(tmp_path, "perov-5", results)
    [(anchor, _, html)] = generative_sections([run])
    assert anchor == "generative" and "0.5" in html and "(random baseline)" in html
    assert "(decoder alone)</td><td>0.75" in html
    assert "<img" not in html and "no generated crystals kept" in html

    from ase import Atoms
    from ase.build import bulk

    corners = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    perovskite = Atoms("SrTiO3", scaled_positions=corners, cell=[3.9] * 3, pbc=True)
    generated = [perovskite, bulk("C", "diamond", a=3.57)]
    write_metrics(tmp_path, "perov-5", results, generated)
    [(_, _, html)] = generative_sections([run])
    assert html.count('<img class="plot"') == 1 and "C2" in html and "O3SrTi" in html


def test_predictive_commands_refuse_a_generative_checkpoint(perov: Path, tmp_path: Path) -> None:
    """evaluate, predict and the calculator load through load_model: one line, not a
    weight-shape error."""
    from matsci_ray.config import ExperimentConfig
    from matsci_ray.errors import CheckpointError
    from matsci_ray.generative.checkpoint import save
    from matsci_ray.train.checkpoint import load_model

    config = ExperimentConfig.model_validate(
        {
            "name": "cdvae-run",
            "tasks": ["perov5-formation-energy"],
            "data": {"root": str(perov)},
            "model": {"name": "cdvae", "params": {**TINY, "max_atoms": 8}},
        }
    )
    save(tmp_path, tiny_model(perov), config)
    with pytest.raises(CheckpointError, match="generative model's checkpoint") as error:
        load_model(tmp_path)
    assert len(str(error.value).splitlines()) == 1 and "matsci-ray generate" in str(error.value)


def _constant_head(head: torch.nn.Module, bias: torch.Tensor) -> None:
    """Make an MLP head output ``bias`` whatever its input: its last layer's weights zero."""
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)


def test_predictor_scores_on_known_heads(perov: Path) -> None:
    """Heads forced to constants: an atom-count head that always says 5 is right on every
    perov-5 crystal and on every prior draw; a lattice head that outputs the training mean
    scores exactly the mean's error; a composition head sure of one element matches no
    perovskite (three elements each)."""
    from matsci_ray.generative.diagnostics import predictor_scores, prior_natoms_seen

    model = tiny_model(perov).eval()
    natoms = torch.full((model.max_atoms + 1,), -50.0)
    natoms[5] = 50.0
    _constant_head(model.natoms_head, natoms)
    _constant_head(model.lattice_head, torch.zeros(6))
    _constant_head(model.composition_head, torch.nn.functional.one_hot(torch.tensor(7), 100) * 50.0)
    scores = predictor_scores(model, graph_batches(perov, "perov-5", "test", 6.0, 5))
    assert scores["natoms_accuracy"] == 1.0
    assert scores["lattice_length_mae"] == pytest.approx(scores["lattice_length_mae_of_mean"])
    assert scores["lattice_length_mae_of_mean"] > 0.01
    assert scores["composition_exact"] == 0.0
    assert prior_natoms_seen(model, {5}) == 1.0
    assert prior_natoms_seen(model, {4, 6}) == 0.0


def test_same_compositions_ignores_atom_order() -> None:
    from matsci_ray.generative.diagnostics import same_compositions

    predicted = torch.tensor([8, 8, 22, 1, 1])
    true = torch.tensor([22, 8, 8, 1, 6])
    assert same_compositions(predicted, true, torch.tensor([3, 2])) == 1


class _ExactDecoder(torch.nn.Module):
    """A score network that knows the true positions of one batch: it outputs exactly the
    denoising target (true - noisy, minimum image, over sigma) and no type preference."""

    def __init__(self, batch: object) -> None:
        super().__init__()
        self.frac = to_fractional(batch.pos, batch.cell, batch.batch)  # type: ignore[attr-defined]

    def forward(
        self, z: Tensor, types: Tensor, pos: Tensor, cell: Tensor, index: Tensor, log_sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        noisy = to_fractional(pos, cell, index)
        target = min_image(self.frac - noisy, cell, index) / log_sigma.exp().unsqueeze(-1)
        return target, torch.zeros(len(pos), 100)


class _ZeroDecoder(torch.nn.Module):
    def forward(
        self, z: Tensor, types: Tensor, pos: Tensor, cell: Tensor, index: Tensor, log_sigma: Tensor
    ) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(pos), torch.zeros(len(pos), 100)


def test_denoising_by_level_on_known_decoders(perov: Path) -> None:
    """A decoder that outputs zero scores ratio 1 at every level; one that outputs the exact
    target scores 0; levels come largest first."""
    from matsci_ray.generative.diagnostics import denoising_by_level

    model = tiny_model(perov).eval()
    batch = next(graph_batches(perov, "perov-5", "test", 6.0, 12))
    model.decoder = _ZeroDecoder()
    zero = denoising_by_level(model, [batch])
    assert len(zero) == len(model.sigmas) and zero[0]["sigma"] > zero[-1]["sigma"]
    assert all(row["ratio"] == pytest.approx(1.0) for row in zero)
    assert all(row["loss"] > 0 for row in zero)
    model.decoder = _ExactDecoder(batch)
    exact = denoising_by_level(model, [batch])
    assert all(row["ratio"] < 1e-4 for row in exact), exact
    assert [r["zero_output_loss"] for r in exact] == [r["zero_output_loss"] for r in zero]


def test_decoder_read_out_starts_at_zero_and_carries_the_noise_gain(perov: Path) -> None:
    """A new decoder outputs zero displacement (the zero-output loss at every level); with
    the same weights, its read-out with ``decoder_gain`` is the one without times
    ``sigma_ref / sigma`` at every level, ``sigma_ref`` the levels' geometric mean."""
    from matsci_ray.generative.objective import noised_positions

    batch = next(graph_batches(perov, "perov-5", "train", 6.0, 8))
    gained = build_encoder("cdvae", 6.0, {**TINY, "max_atoms": 8, "decoder_gain": True})
    plain = build_encoder("cdvae", 6.0, {**TINY, "max_atoms": 8})
    assert isinstance(gained, CDVAE) and isinstance(plain, CDVAE)
    z = torch.randn(len(batch.z), gained.graph_dim)
    for level in range(len(gained.sigmas)):
        at = torch.full((batch.num_graphs,), level)
        noisy, cell, _, sigma = noised_positions(gained, batch, at)
        log_sigma = sigma.log().squeeze(-1)
        out, _ = gained.decoder(z, batch.z, noisy, cell, batch.batch, log_sigma)
        assert torch.count_nonzero(out) == 0
    torch.nn.init.normal_(gained.decoder.edge_weight[-1].weight)
    plain.decoder.load_state_dict(gained.decoder.state_dict(), strict=False)
    sigma_ref = float(gained.sigmas.log().mean().exp())
    for level in range(len(gained.sigmas)):
        at = torch.full((batch.num_graphs,), level)
        noisy, cell, _, sigma = noised_positions(gained, batch, at)
        args = (z, batch.z, noisy, cell, batch.batch, sigma.log().squeeze(-1))
        with torch.no_grad():
            expected = plain.decoder(*args)[0] * sigma_ref / float(gained.sigmas[level])
            torch.testing.assert_close(gained.decoder(*args)[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cdvae_mp", "cdvae_perov5", "cdvae_carbon24"])
def test_each_cdvae_config_builds_and_its_mp_version_learns_on_mp(
    name: str, samples: Path, tmp_path: Path
) -> None:
    """configs/cdvae_*.yaml validate and build at their own sizes; the MP one, shrunk, lowers
    its objective on the Materials Project sample (any MP source ingests to this data set)."""
    from matsci_ray.config import load_config
    from matsci_ray.generative.checkpoint import build
    from matsci_ray.tasks.registry import TASKS
    from tests.samples import ingest_in_process

    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    built = build(config)
    assert isinstance(built, CDVAE)
    # the read-out gain where it was measured to help (benchmarks/README.md, CDVAE)
    assert (built.decoder.log_sigma_ref is not None) == (name == "cdvae_perov5")
    if name != "cdvae_mp":
        return
    tiny = {f"model.params.{k}": v for k, v in TINY.items()}
    config = load_config(
        Path(__file__).parents[1] / "configs" / f"{name}.yaml",
        {**tiny, "data.root": str(tmp_path), "data.cutoff": 5.0},
    )
    docs = samples / "materials_project" / "summary_docs.jsonl"
    ingest_in_process("materials-project", docs, tmp_path)
    task = TASKS[config.tasks[0]]
    model = build(config)
    model.fit_normalisation(normalisation_stats(tmp_path, task.dataset, task.target))
    batch = next(graph_batches(tmp_path, task.dataset, "train", 5.0, 16, targets=(task.target,)))
    torch.manual_seed(0)
    before, after = objective_before_and_after(Objective(model, task.target), batch)
    assert after < 0.7 * before
