"""Finished trials → the MatSciML paper's result tables (3: single task, 4: task pairs,
5: dataset pairs) as Markdown and CSV, with the spread over run seeds.

Cells are the trials' own reported metrics, never recomputed: Markdown rounds them to 4
significant digits, the CSVs keep every digit (``repr`` of the float), so a value of a one-run
cell parses back to exactly the number the trial reported.

Trials come from :func:`matsci_ray.report.load_trials` (``trials.jsonl`` files and plain run
directories). Trials of one cell that differ only in their run seed (``seed`` in their
``params``, as a study with ``seeds: [..]`` writes them, from one study directory) are the
seeds of one configuration: the cell shows their mean ± sample standard deviation (ddof 1)
and n; one run shows its value alone, with no sd. When a cell holds several configurations
(two studies, or trials without a recorded seed) the one with the best mean of the row's
first task is shown, marked "best of k".

Tables 4 and 5 compare each cell with the best single-task configuration of the same task
and model. The difference of the means is marked helped or hurt only when it exceeds the
noise, two standard errors of the difference, 2·√(sd₁²/n₁ + sd₂²/n₂) (Welch's); otherwise it
is "within noise", and with one run on either side "noise unknown (n=1)".
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matsci_ray.models.registry import model_names
from matsci_ray.report import Trial, ordered_tasks
from matsci_ray.tasks.registry import TASKS

# fmt: off
CSV_FIELDS = (
    "table", "row", "column", "model", "combine", "task", "metric", "unit",
    "mean", "sd", "n", "seeds", "single_task_mean", "single_task_sd", "single_task_n",
    "delta", "noise", "effect", "trial_ids", "single_task_trial_ids", "best_of",
    "run_dirs", "params",
)
# fmt: on
NOISE_SE = 2.0  # a pair's change is an effect only beyond this many standard errors
WITHIN_NOISE = "within noise"
NOISE_UNKNOWN = "noise unknown (n=1)"
SPREAD_NOTE = (
    "Cells: mean ± sample standard deviation (n−1) over the n run seeds of a cell; a single "
    "run shows its value alone. A cell with several configurations shows the best mean "
    '("best of k").'
)
EFFECT_NOTE = (
    "In brackets: the change of the mean against the best single-task mean of the same task "
    "and model (lower is better for mse/mae, higher for accuracy). It is marked helped or "
    "hurt only when it exceeds two standard errors of the difference, "
    "2·√(sd₁²/n₁ + sd₂²/n₂) (Welch); otherwise within noise, and noise unknown (n=1) when "
    "either side is a single run."
)


@dataclass
class Table:
    """One table: ``header``/``rows`` formatted for reading, ``records`` exact for CSV."""

    key: str  # "table-3": the HTML id and the CSV's ``table`` column
    title: str
    filename: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)  # those shown in a cell


@dataclass(frozen=True)
class Spread:
    """One metric over the seeds of a configuration: mean, sample sd (None for a single
    run: one value says nothing of the noise) and n, the runs that reported it."""

    mean: float | None
    sd: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        kept = np.array([v for v in values if not math.isnan(v)], dtype=float)
        if not len(kept):
            return cls(None, None, 0)
        sd = float(kept.std(ddof=1)) if len(kept) > 1 else None
        return cls(float(kept.mean()), sd, len(kept))

    def text(self) -> str:
        if self.mean is None or self.sd is None:
            return fmt(self.mean)
        return f"{fmt(self.mean)} ± {fmt(self.sd)} (n={self.n})"


@dataclass(frozen=True)
class Comparison:
    """A cell's mean against its single-task mean: the change, the noise it must exceed
    (two standard errors of the difference; None with a single run on either side) and
    the verdict."""

    delta: float | None
    noise: float | None
    effect: str

    @classmethod
    def of(cls, task: str, cell: Spread, single: Spread) -> Comparison:
        if cell.mean is None or single.mean is None:
            return cls(None, None, "")
        delta = cell.mean - single.mean
        if cell.sd is None or single.sd is None:
            return cls(delta, None, NOISE_UNKNOWN)
        noise = NOISE_SE * math.sqrt(cell.sd**2 / cell.n + single.sd**2 / single.n)
        if abs(delta) <= noise:
            return cls(delta, noise, WITHIN_NOISE)
        better = (delta > 0) == TASKS[task].higher_is_better
        return cls(delta, noise, "helped" if better else "hurt")


def fmt(value: float | None, sign: bool = False) -> str:
    """4 significant digits, trailing zeros kept (``0.4000``) so columns read alike."""
    if value is None:
        return "—"
    return f"{value:+#.4g}" if sign else f"{value:#.4g}"


def seed_of(trial: Trial) -> int | None:
    """The run seed a study recorded in the trial's params (None for other trials)."""
    seed = trial.params.get("seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def spread(trials: Sequence[Trial], task: str) -> Spread:
    values = [v for v in (t.value(task) for t in trials) if v is not None]
    return Spread.of(values)


def _configuration(trial: Trial, index: int) -> Hashable:
    """Trials with the same key differ only in their seed: same study directory, same
    params but seed and label. A trial without a recorded seed is a configuration alone."""
    if seed_of(trial) is None:
        return ("alone", index)
    rest = {k: v for k, v in trial.params.items() if k not in ("seed", "label")}
    where = str(trial.run_dir.parent) if trial.run_dir is not None else ""
    return ("seeds", where, json.dumps(rest, sort_keys=True, default=str))


def configurations(cell: Sequence[Trial]) -> list[list[Trial]]:
    """The cell's trials grouped into configurations, in the order first read."""
    groups: dict[Hashable, list[Trial]] = {}
    for index, trial in enumerate(cell):
        groups.setdefault(_configuration(trial, index), []).append(trial)
    return list(groups.values())


def _best(cell: Sequence[Trial], task: str) -> list[Trial]:
    """The cell's configuration with the best mean of ``task``; unreported ones last."""
    higher = TASKS[task].higher_is_better

    def rank(group: list[Trial]) -> tuple[bool, float]:
        mean = spread(group, task).mean
        if mean is None:
            return True, 0.0
        return False, -mean if higher else mean

    return min(configurations(cell), key=rank)  # min is stable: ties keep the first read


def _best_of(cell: Sequence[Trial]) -> str:
    count = len(configurations(cell))
    return f" (best of {count})" if count > 1 else ""


def _columns(trials: list[Trial]) -> list[str]:
    """Models in registry order (the paper's, then plugins); unregistered ones by name."""
    names = {t.model for t in trials}
    order = model_names()
    return [m for m in order if m in names] + sorted(names - set(order))


def _metric_label(task: str) -> str:
    spec = TASKS[task]
    return f"{spec.metric}, {spec.unit}" if spec.unit else spec.metric


def single_task_table(trials: list[Trial]) -> Table:
    pool = [t for t in trials if t.family == "single-task"]
    models = _columns(pool)
    table = Table(
        "table-3",
        "Table 3: single-task validation metrics",
        "table3_single_task.csv",
        ["task", "metric", *models],
        notes=[SPREAD_NOTE],
    )
    for task in ordered_tasks({t.tasks[0] for t in pool}):
        row = [task, _metric_label(task)]
        for model in models:
            cell = [t for t in pool if t.tasks[0] == task and t.model == model]
            if not cell:
                row.append("—")
                continue
            best = _best(cell, task)
            table.trials += best
            row.append(spread(best, task).text() + _best_of(cell))
            table.records.append(_record(table.key, task, model, best, task, cell))
        table.rows.append(row)
    return table


def _joined(values: Sequence[Any]) -> str:
    return ";".join(str(v) for v in values)  # CSV lists: seeds, trial ids, run directories


def _record(
    key: str,
    row: str,
    column: str,
    group: list[Trial],
    task: str,
    cell: Sequence[Trial],
    single: list[Trial] | None = None,
) -> dict[str, Any]:
    """One CSV row: a task's spread in one cell, and its comparison with the single task."""
    spec, first = TASKS[task], group[0]
    own, base = spread(group, task), spread(single or [], task)
    compared = Comparison.of(task, own, base)

    def blank(value: Any) -> Any:
        return "" if value is None else value

    return {
        "table": key,
        "row": row,
        "column": column,
        "model": first.model,
        "combine": first.combine or "",
        "task": task,
        "metric": spec.metric,
        "unit": spec.unit,
        "mean": blank(own.mean),
        "sd": blank(own.sd),
        "n": own.n,
        "seeds": _joined([s for s in map(seed_of, group) if s is not None]),
        "single_task_mean": blank(base.mean),
        "single_task_sd": blank(base.sd),
        "single_task_n": base.n if single else "",
        "delta": blank(compared.delta),
        "noise": blank(compared.noise),
        "effect": compared.effect,
        "trial_ids": _joined([t.trial_id for t in group]),
        "single_task_trial_ids": _joined([t.trial_id for t in single or []]),
        "best_of": len(configurations(cell)),
        "run_dirs": _joined([t.run_dir for t in group if t.run_dir is not None]),
    }


def _pair_text(record: dict[str, Any], own: Spread) -> str:
    """``mean ± sd (n=…)``, then the change against the single task and its verdict."""
    text = own.text()
    if record["delta"] != "":
        text += f" [{fmt(record['delta'], sign=True)}, {record['effect']}]"
    return text


def _pair_table(trials: list[Trial], table: Table, family: str, by_combine: bool) -> Table:
    """Tables 4 and 5: per row a set of tasks, per cell each task's metric and its change
    against the best single-task configuration of the same task and model."""
    singles = [t for t in trials if t.family == "single-task"]
    pool = [t for t in trials if t.family == family]
    models = _columns(pool)

    def column_of(t: Trial) -> tuple[str, str]:
        return (t.model, t.combine or "additive") if by_combine else (t.model, t.column)

    def pair(t: Trial) -> tuple[str, ...]:
        return tuple(ordered_tasks(t.tasks))

    columns = (
        [(m, c) for m in models for c in ("additive", "pcgrad")]
        if by_combine
        else sorted({column_of(t) for t in pool}, key=lambda mc: (models.index(mc[0]), mc[1]))
    )
    names = [f"{m} {c}" if by_combine else c for m, c in columns]
    table.header += names
    order = list(TASKS)
    for tasks in sorted({pair(t) for t in pool}, key=lambda ts: [order.index(x) for x in ts]):
        label = " + ".join(tasks)
        datasets = " + ".join(dict.fromkeys(TASKS[x].dataset for x in tasks))
        row = [label, " / ".join(_metric_label(x) for x in tasks)]
        if family == "dataset-pair":
            row.insert(0, datasets)
        for (model, column), name in zip(columns, names, strict=True):
            cell = [t for t in pool if pair(t) == tasks and column_of(t) == (model, column)]
            if not cell:
                row.append("—")
                continue
            best = _best(cell, tasks[0])
            table.trials += best
            parts = []
            for task in tasks:
                own = [s for s in singles if s.tasks[0] == task and s.model == model]
                single = _best(own, task) if own else None
                record = _record(table.key, label, name, best, task, cell, single)
                table.records.append(record)
                parts.append(_pair_text(record, spread(best, task)))
            row.append(" / ".join(parts) + _best_of(cell))
        table.rows.append(row)
    table.notes += [SPREAD_NOTE, EFFECT_NOTE]
    return table


def task_pair_table(trials: list[Trial]) -> Table:
    table = Table(
        "table-4",
        "Table 4: task pairs (additive vs PCGrad)",
        "table4_task_pairs.csv",
        ["task pair", "metrics"],
    )
    return _pair_table(trials, table, "task-pair", by_combine=True)


def dataset_pair_table(trials: list[Trial]) -> Table:
    table = Table(
        "table-5",
        "Table 5: dataset pairs",
        "table5_dataset_pairs.csv",
        ["dataset pair", "tasks", "metrics"],
    )
    return _pair_table(trials, table, "dataset-pair", by_combine=False)


def sweep_table(trials: list[Trial]) -> Table:
    """One row per trial: sampled points differ, so each is a configuration of its own."""
    table = Table(
        "table-sweep",
        "Hyperparameter sweeps",
        "sweeps.csv",
        ["trial", "tasks", "model", "params", "metrics"],
    )
    for t in (t for t in trials if t.family == "sweep"):
        table.trials.append(t)
        params = json.dumps(t.params, sort_keys=True)
        table.rows.append(
            [
                t.trial_id,
                " + ".join(t.tasks),
                t.column,
                params,
                " / ".join(fmt(t.value(x)) for x in t.tasks),
            ]
        )
        table.records += [
            {**_record(table.key, t.trial_id, t.column, [t], x, [t]), "params": params}
            for x in t.tasks
        ]
    return table


def build_tables(trials: list[Trial]) -> list[Table]:
    """Tables 3, 4, 5 and the sweeps, from the trials that finished without error."""
    trials = [t for t in trials if t.error is None]
    return [
        single_task_table(trials),
        task_pair_table(trials),
        dataset_pair_table(trials),
        sweep_table(trials),
    ]


def left_out(trials: list[Trial]) -> str | None:
    """A sentence naming the trials no table shows: failed ones and plain multi-task runs."""
    failed = [f"{t.trial_id} ({t.error.splitlines()[0]})" for t in trials if t.error]
    other = [t.trial_id for t in trials if not t.error and t.family == "multi-task"]
    parts = [f"failed: {', '.join(failed)}"] * bool(failed)
    parts += [f"runs of 3+ tasks: {', '.join(other)}"] * bool(other)
    return f"Not in the tables: {'; '.join(parts)}." if parts else None


def to_markdown(tables: list[Table], trials: list[Trial] | None = None) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [
        "# MatSciML leaderboard",
        "",
        "Validation metrics as reported by each trial (4 significant digits; the CSVs "
        "hold every digit), as mean ± sd (n) over the run seeds of a cell. Pairs are marked "
        "helped or hurt only beyond two standard errors of the difference (see each table).",
        "",
    ]
    for table in tables:
        out += [f"## {table.title}", ""]
        if not table.rows:
            out += ["_No trials._", ""]
            continue
        out += [line(table.header), line(["---"] * len(table.header))]
        out += [line(r) for r in table.rows] + [""]
        out += [part for note in table.notes for part in (f"_{note}_", "")]  # a paragraph each
    note = left_out(trials or [])
    out += [f"_{note}_"] if note else []
    return "\n".join(out).rstrip() + "\n"


def write_tables(
    trials: list[Trial], out_dir: Path | str, tables: list[Table] | None = None
) -> dict[str, Path]:
    """``leaderboard.md`` and one CSV per table; returns ``{"leaderboard": path, key: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(trials) if tables is None else tables
    written = {"leaderboard": out / "leaderboard.md"}
    written["leaderboard"].write_text(to_markdown(tables, trials))
    for table in tables:
        path = written[table.key] = out / table.filename
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(table.records)  # floats as str(): their shortest exact repr
    return written
