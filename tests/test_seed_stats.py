"""Seed statistics: studies train every cell once per seed, tables show mean ± sd and n, and a
pair is marked helped or hurt only beyond two standard errors of the difference. Synthetic
trials with a known spread, written as ``run_study`` writes them; no Ray."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from matsci_ray.config import StudyConfig, dump_config
from matsci_ray.experiments.study import trial_config, variants
from matsci_ray.report import load_trials
from matsci_ray.report.html import render_html
from matsci_ray.report.tables import NOISE_UNKNOWN, WITHIN_NOISE, fmt, write_tables
from matsci_ray.tasks.registry import TASKS

BG, SG = "mp-band-gap", "mp-space-group"  # mse (lower is better), accuracy (higher is better)
SEEDS = [0, 1, 2, 3, 4]


def _row(study: str, tasks: list[str], seed: int, values: list[float], **cell: Any) -> dict:
    """A trials.jsonl line as run_study writes it: the variant, seed included, as params."""
    combine = cell.get("combine")
    label = "_".join(tasks) + (f"-{combine}" if combine else "") + f"-egnn-seed{seed}"
    variant = {"tasks": tasks, "model": "egnn", "combine": combine, "seed": seed, "label": label}
    metrics = {f"val/{TASKS[t].metric_name}": v for t, v in zip(tasks, values, strict=True)}
    return {
        "trial_id": f"{study}-{label}",
        "family": "single-task" if len(tasks) == 1 else "task-pair",
        "tasks": tasks,
        "model": "egnn",
        "combine": combine,
        "seed": seed,
        "params": variant,
        "run_dir": f"runs/{label}",
        "metrics": {**metrics, "epoch": 3},
    }


def _write(directory: Path, rows: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _draw(rng: np.random.Generator, mean: float, sd: float, n: int = len(SEEDS)) -> np.ndarray:
    return rng.normal(mean, sd, n)


def _standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's standard error of the difference of the means, from numpy (ddof=1)."""
    return math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


def _experiment(tmp_path: Path, single: dict[str, np.ndarray], pair: dict[str, np.ndarray]):
    """Single-task seeds of both tasks and additive task-pair seeds; returns the tables."""
    rows = []
    for task, values in single.items():
        rows += [_row("st", [task], s, [v]) for s, v in zip(SEEDS, values, strict=False)]
    _write(tmp_path / "single", rows)
    count = len(pair[BG])
    _write(
        tmp_path / "pairs",
        [
            _row("tp", [BG, SG], s, [pair[BG][k], pair[SG][k]], combine="additive")
            for k, s in enumerate(SEEDS[:count])
        ],
    )
    paths = write_tables(load_trials([tmp_path]), tmp_path / "report")
    with paths["table-4"].open(newline="") as fh:
        records = {r["task"]: r for r in csv.DictReader(fh)}
    return records, paths


def _shifted(rng: np.random.Generator, base: np.ndarray, sd: float, se_units: float):
    """Seeds with spread ``sd`` whose mean differs from ``base``'s by ``se_units`` standard
    errors of the difference, as numpy measures both samples."""
    drawn = _draw(rng, 0.0, sd)
    se = _standard_error(drawn, base)
    return drawn - drawn.mean() + base.mean() + se_units * se


@pytest.mark.parametrize(
    ("se_units", "band_gap", "space_group"),
    [
        (5.0, "hurt", "helped"),  # mse up is worse; accuracy up is better
        (-5.0, "helped", "hurt"),
        (0.5, WITHIN_NOISE, WITHIN_NOISE),
        (-0.5, WITHIN_NOISE, WITHIN_NOISE),
        (1.9, WITHIN_NOISE, WITHIN_NOISE),
        (2.1, "hurt", "helped"),
    ],
)
def test_effect_is_marked_only_beyond_two_standard_errors(
    tmp_path: Path, se_units: float, band_gap: str, space_group: str
) -> None:
    rng = np.random.default_rng(17)
    single = {BG: _draw(rng, 0.5, 0.05), SG: _draw(rng, 0.3, 0.02)}
    pair = {
        BG: _shifted(rng, single[BG], 0.08, se_units),
        SG: _shifted(rng, single[SG], 0.03, se_units),
    }
    records, _ = _experiment(tmp_path, single, pair)
    assert records[BG]["effect"] == band_gap
    assert records[SG]["effect"] == space_group
    for task in (BG, SG):
        record = records[task]
        se = _standard_error(pair[task], single[task])
        assert float(record["noise"]) == pytest.approx(2 * se, rel=1e-12)
        assert float(record["delta"]) == pytest.approx(se_units * se, rel=1e-9)
        assert (record["n"], record["single_task_n"]) == ("5", "5")


@pytest.mark.parametrize(("single_seeds", "pair_seeds"), [(1, 5), (5, 1), (1, 1)])
def test_a_single_run_on_either_side_is_never_marked(
    tmp_path: Path, single_seeds: int, pair_seeds: int
) -> None:
    rng = np.random.default_rng(3)
    # a difference of 40 sd: it would be "helped" by any test that ignored n
    single = {BG: _draw(rng, 0.5, 0.01, single_seeds), SG: _draw(rng, 0.3, 0.01, single_seeds)}
    pair = {BG: _draw(rng, 0.1, 0.01, pair_seeds), SG: _draw(rng, 0.7, 0.01, pair_seeds)}
    records, paths = _experiment(tmp_path, single, pair)
    for task in (BG, SG):
        assert records[task]["effect"] == NOISE_UNKNOWN and records[task]["noise"] == ""
        delta = pair[task].mean() - single[task].mean()
        assert float(records[task]["delta"]) == pytest.approx(delta)
    cells = [line for line in paths["leaderboard"].read_text().splitlines() if line[:2] == "| "]
    assert not any(word in line for line in cells for word in ("helped", "hurt"))


def test_cells_show_numpys_mean_and_sd(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    single = {BG: _draw(rng, 0.5, 0.05), SG: _draw(rng, 0.3, 0.02)}
    pair = {BG: _draw(rng, 0.45, 0.05), SG: _draw(rng, 0.32, 0.02)}
    records, paths = _experiment(tmp_path, single, pair)
    markdown = paths["leaderboard"].read_text()
    for task in (BG, SG):
        mean, sd = float(pair[task].mean()), float(pair[task].std(ddof=1))
        assert float(records[task]["mean"]) == pytest.approx(mean, rel=1e-15)
        assert float(records[task]["sd"]) == pytest.approx(sd, rel=1e-12)
        assert records[task]["seeds"] == "0;1;2;3;4"
        assert f"{fmt(mean)} ± {fmt(sd)} (n=5)" in markdown
        own = single[task]
        assert f"{fmt(float(own.mean()))} ± {fmt(float(own.std(ddof=1)))} (n=5)" in markdown
    assert "two standard errors of the difference" in markdown  # the rule is stated


def test_single_task_best_of_compares_means(tmp_path: Path) -> None:
    """Two studies fill one cell: the one with the best seed (0.10) has the worse mean."""
    lucky = [0.10, 0.90, 0.80]
    steady = [0.30, 0.31, 0.29]
    _write(tmp_path / "a", [_row("a", [BG], s, [v]) for s, v in enumerate(lucky)])
    _write(tmp_path / "b", [_row("b", [BG], s, [v]) for s, v in enumerate(steady)])
    paths = write_tables(load_trials([tmp_path]), tmp_path / "report")
    with paths["table-3"].open(newline="") as fh:
        (record,) = list(csv.DictReader(fh))
    assert record["trial_ids"].split(";") == [f"b-{BG}-egnn-seed{s}" for s in range(3)]
    assert (record["best_of"], record["n"]) == ("2", "3")
    assert float(record["mean"]) == pytest.approx(np.mean(steady))
    text = f"{fmt(float(np.mean(steady)))} ± {fmt(float(np.std(steady, ddof=1)))} (n=3)"
    assert f"{text} (best of 2)" in paths["leaderboard"].read_text()


def test_html_charts_the_spread(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    single = {BG: _draw(rng, 0.5, 0.05), SG: _draw(rng, 0.3, 0.02)}
    _experiment(tmp_path, single, {BG: _draw(rng, 0.4, 0.05), SG: _draw(rng, 0.3, 0.02)})
    page = render_html(load_trials([tmp_path]))
    tables = page[page.index('<section id="tables">') : page.index("</section>")]
    charts = re.findall(r'<figure class="spread"><img class="plot"[^>]*base64,([^"]+)"', tables)
    assert len(charts) == 2  # Tables 3 and 4; Table 5 has no trials
    assert all(base64.b64decode(c).startswith(b"\x89PNG") for c in charts)
    assert "mean ± sd over seeds" in tables


def _study(**fields: Any) -> StudyConfig:
    base = {"name": "t", "tasks": [BG], "data": {"root": "data"}, "run": {"seed": 42}}
    return StudyConfig.model_validate({"name": "s", "base": base, **fields})


def test_seeds_make_one_trial_per_cell_and_seed() -> None:
    study = _study(family="task-pair", task_pairs=[[BG, SG]], seeds=[0, 1])
    grid = variants(study)
    assert len(grid) == 4  # additive and PCGrad, two seeds each
    configs = [trial_config(dump_config(study.base), {"variant": v}) for v in grid]
    assert len({c.name for c in configs}) == 4
    assert sorted((c.loss.combine, c.run.seed) for c in configs) == [
        ("additive", 0),
        ("additive", 1),
        ("pcgrad", 0),
        ("pcgrad", 1),
    ]
    assert all(c.name.endswith(f"-seed{c.run.seed}") for c in configs)


def test_default_seed_is_the_base_runs() -> None:
    study = _study(family="single-task", tasks=[BG])
    assert study.seeds == [42]
    (variant,) = variants(study)
    assert trial_config(dump_config(study.base), {"variant": variant}).run.seed == 42


def test_a_variant_without_a_seed_keeps_the_base_seed() -> None:
    """Tune restores an interrupted study with the variants it stored before seeds existed."""
    study = _study(family="single-task", tasks=[BG])
    old = {"tasks": [BG], "model": "egnn", "combine": None, "label": f"{BG}-egnn"}
    config = trial_config(dump_config(study.base), {"variant": old})
    assert (config.name, config.run.seed) == (f"t-{BG}-egnn", 42)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"family": "single-task", "seeds": [1, 2, 1]}, r"seed\(s\) \[1\] listed twice"),
        ({"family": "single-task", "seeds": []}, "at least 1 item"),
        ({"family": "sweep", "seeds": [1, 2]}, "a sweep takes one seed"),
    ],
)
def test_bad_seed_lists_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _study(**fields)


def test_a_sweeps_one_seed_is_its_run_seed() -> None:
    assert _study(family="sweep", seeds=[7]).base.run.seed == 7
