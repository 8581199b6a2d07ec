"""Finished trials → the MatSciML paper's result tables (3: single task, 4: task pairs,
5: dataset pairs) as Markdown and CSV.

Cells are the trials' own reported metrics, never recomputed: Markdown rounds them to 4
significant digits, the CSVs keep every digit (``repr`` of the float), so a CSV value parses
back to exactly the number the trial reported.

Trials come from :func:`matsci_ray.report.load_trials` (``trials.jsonl`` files and plain run
directories). When several trials fill one cell the best (by the row's first task) is shown and
``n_trials`` in the CSV counts them.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matsci_ray.models.registry import model_names
from matsci_ray.report import Trial, ordered_tasks
from matsci_ray.tasks.registry import TASKS

# fmt: off
CSV_FIELDS = (
    "table", "row", "column", "model", "combine", "task", "metric", "unit", "value",
    "single_task_value", "delta", "effect", "trial_id", "single_task_trial_id", "n_trials",
    "run_dir", "params",
)
# fmt: on


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


def fmt(value: float | None, sign: bool = False) -> str:
    """4 significant digits, trailing zeros kept (``0.4000``) so columns read alike."""
    if value is None:
        return "—"
    return f"{value:+#.4g}" if sign else f"{value:#.4g}"


def effect(task: str, delta: float | None) -> str:
    """Whether a change of the task's metric is for the better (lower error, higher accuracy)."""
    if delta is None or math.isnan(delta):
        return ""
    if delta == 0:
        return "same"
    return "helped" if (delta > 0) == TASKS[task].higher_is_better else "hurt"


def _best(trials: list[Trial], task: str) -> Trial:
    """The cell's trial when several qualify: best value of ``task``; unreported values last."""
    higher = TASKS[task].higher_is_better

    def rank(t: Trial) -> tuple[bool, float]:
        v = t.value(task)
        if v is None or math.isnan(v):
            return True, 0.0
        return False, -v if higher else v

    return min(trials, key=rank)  # min is stable: ties keep the first trial read


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
    )
    for task in ordered_tasks({t.tasks[0] for t in pool}):
        row = [task, _metric_label(task)]
        for model in models:
            cell = [t for t in pool if t.tasks[0] == task and t.model == model]
            if not cell:
                row.append("—")
                continue
            best = _best(cell, task)
            table.trials.append(best)
            row.append(fmt(best.value(task)) + (f" (best of {len(cell)})" if len(cell) > 1 else ""))
            table.records.append(_record(table.key, task, model, best, task, len(cell)))
        table.rows.append(row)
    return table


def _record(
    key: str, row: str, column: str, trial: Trial, task: str, n: int, single: Trial | None = None
) -> dict[str, Any]:
    spec = TASKS[task]
    value, base = trial.value(task), single.value(task) if single is not None else None
    delta = value - base if value is not None and base is not None else None
    return {
        "table": key,
        "row": row,
        "column": column,
        "model": trial.model,
        "combine": trial.combine or "",
        "task": task,
        "metric": spec.metric,
        "unit": spec.unit,
        "value": "" if value is None else value,
        "single_task_value": "" if base is None else base,
        "delta": "" if delta is None else delta,
        "effect": effect(task, delta),
        "trial_id": trial.trial_id,
        "single_task_trial_id": single.trial_id if single else "",
        "n_trials": n,
        "run_dir": str(trial.run_dir or ""),
    }


def _pair_table(trials: list[Trial], table: Table, family: str, by_combine: bool) -> Table:
    """Tables 4 and 5: per row a set of tasks, per cell each task's metric and its change
    against the best single-task trial of the same task and model."""
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
            table.trials.append(best)
            parts = []
            for task in tasks:
                own = [s for s in singles if s.tasks[0] == task and s.model == model]
                single = _best(own, task) if own else None
                record = _record(table.key, label, name, best, task, len(cell), single)
                table.records.append(record)
                text = fmt(best.value(task))
                if record["delta"] != "":
                    text += f" ({fmt(record['delta'], sign=True)} {record['effect']})"
                parts.append(text)
            row.append(" / ".join(parts) + (f" (best of {len(cell)})" if len(cell) > 1 else ""))
        table.rows.append(row)
    table.notes.append(
        "Cells: each task's metric in row order; in brackets the change against the best "
        "single-task trial of the same task and model (lower is better for mse/mae, higher "
        "for accuracy), marked helped or hurt."
    )
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
            {**_record(table.key, t.trial_id, t.column, t, x, 1), "params": params} for x in t.tasks
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
        "hold every digit). When several trials fill a cell the best is shown.",
        "",
    ]
    for table in tables:
        out += [f"## {table.title}", ""]
        if not table.rows:
            out += ["_No trials._", ""]
            continue
        out += [line(table.header), line(["---"] * len(table.header))]
        out += [line(r) for r in table.rows] + [""] + [f"_{n}_" for n in table.notes]
        out += [""] if table.notes else []
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
