"""``matsci-ray report``: tables hold exactly the trials' metrics, deltas have the right sign,
the HTML embeds every plot kind, the CLI writes its files. No Ray: data are ingested
in-process and checkpoints come from a freshly built tiny model."""

from __future__ import annotations

import argparse
import base64
import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from matsci_ray.cli import report as report_cli
from matsci_ray.report import load_trials
from matsci_ray.report.tables import NOISE_UNKNOWN, build_tables, write_tables
from matsci_ray.tasks.registry import TASKS
from matsci_ray.train.checkpoint import save_checkpoint
from tests.samples import ingest_in_process, tiny_model

BG, SG, FE, OQ, EF = (
    "mp-band-gap",
    "mp-space-group",
    "mp-formation-energy",
    "oqmd-formation-energy",
    "mp-fermi-energy",
)


@pytest.fixture(scope="module")
def data_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Materials Project samples ingested without Ray."""
    source = samples / "materials_project" / "summary_docs.jsonl"
    return ingest_in_process("materials-project", source, tmp_path_factory.mktemp("ingested"))


def _history(run_dir: Path, finals: dict[str, float], epochs: int = 3) -> None:
    """Epoch rows whose last one reports ``finals`` (task → primary metric) exactly."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for epoch in range(1, epochs + 1):
        row: dict[str, Any] = {"epoch": epoch, "lr": 1e-3, "train/samples_per_s": 50.0}
        for task, final in finals.items():
            row[f"train/{task}/loss"] = 1.0 / epoch
            row[f"val/{TASKS[task].metric_name}"] = final * (1 + 0.1 * (epochs - epoch))
        lines.append(json.dumps(row))
    (run_dir / "history.jsonl").write_text("\n".join(lines) + "\n")


def _checkpoint(run_dir: Path, root: Path, tasks: list[str]) -> None:
    model, config = tiny_model(run_dir.name, root, tasks)
    (run_dir / "checkpoint_000002").mkdir(parents=True)
    save_checkpoint(run_dir / "checkpoint_000002", model, config, epoch=3)


def _trial(
    tid: str,
    family: str,
    tasks: list[str],
    model: str,
    values: list[float],
    combine: str | None = None,
    run_dir: str | None = None,
    **params: Any,
) -> dict:
    metrics = {f"val/{TASKS[t].metric_name}": v for t, v in zip(tasks, values, strict=True)}
    return {
        "trial_id": tid,
        "family": family,
        "tasks": tasks,
        "datasets": list(dict.fromkeys(TASKS[t].dataset for t in tasks)),
        "model": model,
        "combine": combine,
        "params": params,
        "run_dir": run_dir,
        "metrics": {**metrics, "epoch": 3, f"val/{tasks[0]}/mae": 0.1},
    }


def _experiment(directory: Path, trials: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for t in trials:
        if t["run_dir"]:
            finals = {task: t["metrics"][f"val/{TASKS[task].metric_name}"] for task in t["tasks"]}
            _history(directory / t["run_dir"], finals)
    (directory / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))


@pytest.fixture(scope="module")
def results(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("results")
    _experiment(
        base / "tune-single",
        [
            _trial("st-bg-egnn-a", "single-task", [BG], "egnn", [0.5], run_dir="st-bg-egnn-a"),
            _trial("st-bg-egnn-b", "single-task", [BG], "egnn", [0.7], run_dir="st-bg-egnn-b"),
            _trial("st-sg-egnn", "single-task", [SG], "egnn", [0.3], run_dir="st-sg-egnn"),
            _trial("st-bg-megnet", "single-task", [BG], "megnet", [0.123456789]),
            _trial("st-fe-egnn", "single-task", [FE], "egnn", [0.25]),
        ],
    )
    _experiment(
        base / "tune-pairs",
        [
            _trial("tp-add", "task-pair", [BG, SG], "egnn", [0.4, 0.25], "additive", "tp-add"),
            # listed the other way round: still the same row of Table 4
            _trial("tp-pc", "task-pair", [SG, BG], "egnn", [0.35, 0.55], "pcgrad", "tp-pc"),
            # failed trials stay out of the tables, however good their partial metrics look
            {**_trial("tp-bad", "task-pair", [BG, SG], "egnn", [0.01, 0.99]), "error": "OOM"},
        ],
    )
    _checkpoint(base / "tune-pairs" / "tp-add", data_root, [BG, SG])
    _experiment(
        base / "tune-datasets",
        [
            _trial("dp", "dataset-pair", [FE, OQ], "egnn", [0.2, 0.3], "additive"),
        ],
    )
    _experiment(
        base / "tune-sweep",
        [
            _trial(f"sw{k}", "sweep", [BG], "egnn", [v], run_dir=f"sw{k}", lr=lr)
            for k, (v, lr) in enumerate([(0.6, 1e-3), (0.45, 3e-4)])
        ],
    )
    plain = base / "runs" / "fermi"  # a plain `matsci-ray train` run: history + checkpoint
    _history(plain, {EF: 0.987654321})
    _checkpoint(plain, data_root, [EF])
    return base


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _cell(rows: list[dict[str, str]], trial_id: str, task: str) -> dict[str, str]:
    (row,) = [r for r in rows if r["trial_ids"] == trial_id and r["task"] == task]
    return row


def test_trials_are_found_once(results: Path) -> None:
    trials = {t.trial_id: t for t in load_trials([results])}
    # trial directories hold a history.jsonl too, but their trials.jsonl accounts for them
    assert len(trials) == 12 and trials["tp-bad"].error == "OOM"
    fermi = trials["fermi"]
    assert (fermi.family, fermi.model, fermi.tasks) == ("single-task", "egnn", [EF])
    assert fermi.metrics["epoch"] == 3
    assert trials["tp-add"].run_dir == (results / "tune-pairs" / "tp-add").resolve()


def test_tables_hold_the_trials_numbers_exactly(results: Path, tmp_path: Path) -> None:
    trials = load_trials([results])
    by_id = {t.trial_id: t for t in trials}
    paths = write_tables(trials, tmp_path)
    for key, path in paths.items():
        if key == "leaderboard":
            continue
        for row in _csv(path):
            if row["mean"]:  # one run per cell here: its mean is its value, and no sd
                reported = by_id[row["trial_ids"]].metrics[f"val/{row['task']}/{row['metric']}"]
                assert float(row["mean"]) == reported and row["sd"] == "", row
                assert row["n"] == "1", row

    table3 = _csv(paths["table-3"])
    best = [r for r in table3 if r["task"] == BG and r["model"] == "egnn"]
    # two trials without a recorded seed: two configurations, the better one shown
    assert [(r["trial_ids"], r["best_of"]) for r in best] == [("st-bg-egnn-a", "2")]
    assert float(_cell(table3, "st-bg-megnet", BG)["mean"]) == 0.123456789
    assert float(_cell(table3, "fermi", EF)["mean"]) == 0.987654321
    assert _cell(table3, "fermi", EF)["unit"] == "(eV)²"
    markdown = paths["leaderboard"].read_text()
    assert "| 0.1235 |" in markdown and "0.9877" in markdown  # 4 significant digits


def test_deltas_of_single_runs_are_not_marked(results: Path, tmp_path: Path) -> None:
    """One run on each side: the change is computed with its sign, but one value says
    nothing of the noise, so neither helped nor hurt is claimed."""
    paths = write_tables(load_trials([results]), tmp_path)
    table4 = _csv(paths["table-4"])
    assert {r["row"] for r in table4} == {f"{BG} + {SG}"}
    row = _cell(table4, "tp-add", BG)
    assert (float(row["delta"]), row["effect"], row["noise"]) == (0.4 - 0.5, NOISE_UNKNOWN, "")
    assert row["single_task_trial_ids"] == "st-bg-egnn-a" and row["column"] == "egnn additive"
    assert float(_cell(table4, "tp-pc", BG)["delta"]) == 0.55 - 0.5
    assert float(_cell(table4, "tp-add", SG)["delta"]) == 0.25 - 0.3
    assert {r["effect"] for r in table4} == {NOISE_UNKNOWN}

    table5 = _csv(paths["table-5"])
    assert _cell(table5, "dp", FE)["effect"] == NOISE_UNKNOWN
    assert _cell(table5, "dp", OQ)["delta"] == ""  # no single-task OQMD trial to compare with

    assert "tp-bad" not in {r["trial_ids"] for r in table4}
    markdown = paths["leaderboard"].read_text()
    assert "failed: tp-bad (OOM)" in markdown
    assert f"0.4000 [-0.1000, {NOISE_UNKNOWN}] / 0.2500 [-0.05000, {NOISE_UNKNOWN}]" in markdown
    cells = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert not any("helped" in c or "hurt" in c for c in cells)
    sweeps = _csv(paths["table-sweep"])
    assert [json.loads(r["params"]) for r in sweeps] == [{"lr": 1e-3}, {"lr": 3e-4}]


def test_bad_trials_file_names_the_line(tmp_path: Path) -> None:
    bad = _trial("x", "ensemble", [BG], "egnn", [0.1])
    (tmp_path / "trials.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"trials\.jsonl:1: family 'ensemble'"):
        load_trials([tmp_path])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matsci-ray")
    report_cli.register(parser.add_subparsers(dest="verb", required=True))
    return parser


@pytest.fixture(scope="module")
def report_dir(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    args = _parser().parse_args(["report", str(results), "--out", str(out)])
    assert args.func(args) == 0
    return out


def _section(page: str, key: str) -> str:
    start = page.index(f'<section id="{key}">')
    return page[start : page.index("</section>", start)]


def test_html_embeds_tables_and_every_plot_kind(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    assert "<script" not in page and "<link" not in page  # self-contained
    for key in ("table-3", "table-4", "table-5"):
        assert f'<table id="{key}">' in page
    for key in ("learning-curves", "parity", "confusion"):
        images = re.findall(
            r'<img class="plot"[^>]*src="data:image/png;base64,([^"]+)"', _section(page, key)
        )
        assert images, key
        assert base64.b64decode(images[0]).startswith(b"\x89PNG")
    # one run per cell: no spread to chart, the tables hold the values
    assert 'class="spread"' not in _section(page, "tables")
    # the parity plots are the pair's band gap and the plain run's Fermi energy
    assert _section(page, "parity").count('class="plot"') == 2
    assert "st-sg-egnn: no checkpoint" in page


def test_cli_writes_files_and_prints_paths(
    report_dir: Path, results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {p.name for p in report_dir.iterdir()}
    assert {
        "leaderboard.md",
        "report.html",
        "table3_single_task.csv",
        "table4_task_pairs.csv",
        "table5_dataset_pairs.csv",
    } <= names

    args = _parser().parse_args(["report", str(results), "--out", str(tmp_path), "--no-plots"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "report.html") in printed and str(tmp_path / "leaderboard.md") in printed
    assert "data:image/png" not in (tmp_path / "report.html").read_text()

    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["report", "--help"])
    assert exit_.value.code == 0
    assert "--no-plots" in capsys.readouterr().out


def test_no_trials_is_a_user_error(tmp_path: Path) -> None:
    from matsci_ray.cli.main import UserError

    args = _parser().parse_args(["report", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"no trials\.jsonl"):
        args.func(args)


def test_tables_without_any_trials_are_empty() -> None:
    assert all(not t.rows and not t.records for t in build_tables([]))
