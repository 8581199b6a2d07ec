"""``report.html``: one self-contained page (no external JS or CSS, plots as base64 PNG) with
the result tables, learning curves, parity plots and confusion matrices.

Parity plots and confusion matrices come from each run's last checkpoint, scored in-process
on at most ``max_structures`` structures of its validation split (pyarrow + the training
graph transform; no Ray). Their captions' errors are of that subset, so they can differ from
the tables, which always show the trials' own reported metrics.

Under each of Tables 3–5 whose cells hold several seeds, ``figure.spread`` charts every
cell's mean with ±sd error bars (beside its single-task configuration in Tables 4 and 5); the
tables' notes state how helped, hurt and "within noise" are decided
(:mod:`matsci_ray.report.tables`).

Stable hooks for browser tests: ``section#tables`` with ``table#table-3`` … ``#table-5``,
``section#learning-curves``, ``section#parity``, ``section#confusion``; every plot is an
``img.plot``, and a skipped plot leaves a ``p.note`` saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from matsci_ray import keys as K
from matsci_ray.report import Trial, latest_checkpoint
from matsci_ray.report.figures import figure_html, new_figure, note
from matsci_ray.report.generative import generative_sections
from matsci_ray.report.tables import Table, build_tables, left_out
from matsci_ray.storage import location, parquet_source, resolve
from matsci_ray.tasks.registry import TASKS, metric_key
from matsci_ray.train.telemetry import read_history

MAX_STRUCTURES = 500
GEOMETRY = [K.ATOMIC_NUMBERS, K.POSITIONS, K.CELL, K.PBC, K.NATOMS]
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figcaption, .note { font-size: 0.85em; color: #555; }
img.plot { max-width: 100%; }
"""


def learning_curves(trial: Trial) -> str:
    """Train loss of every task, then each task's primary validation metric, vs epoch."""
    history = read_history(trial.run_dir) if trial.run_dir is not None else []
    if not history:
        return note(f"{trial.trial_id}: no history.jsonl, no learning curve")
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(3.2 * (1 + len(trial.tasks)), 2.6)
    axes = fig.subplots(1, 1 + len(trial.tasks), squeeze=False)[0]
    epochs = [row["epoch"] for row in history]
    for task in trial.tasks:
        loss = [row.get(f"train/{task}/loss", np.nan) for row in history]
        axes[0].plot(epochs, loss, marker=".", label=task)
    axes[0].set(title="train loss", xlabel="epoch", yscale="log")
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for ax, task in zip(axes[1:], trial.tasks, strict=True):
        spec = TASKS[task]
        ax.plot(epochs, [row.get(metric_key(task), np.nan) for row in history], marker=".")
        ax.set(title=f"val {task}", xlabel="epoch", ylabel=f"{spec.metric} {spec.unit}".strip())
    return figure_html(
        fig,
        f"learning curves of {trial.trial_id}",
        f"{trial.trial_id} ({trial.family}, {trial.column})",
        "learning-curve",
    )


def _val_rows(
    config: Any, dataset: str, columns: list[str], limit: int
) -> Iterator[dict[str, np.ndarray]]:
    """Column batches of the first ``limit`` validation rows, with the training graph columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from matsci_ray.data.dataset import shard_paths
    from matsci_ray.graphs.batching import RadiusGraphTransform

    transform = RadiusGraphTransform(config.data.cutoff, config.data.max_neighbors)
    for path in shard_paths(config.data.root, dataset, config.data.val_split):
        source = parquet_source(location(path))
        for chunk in pq.ParquetFile(source).iter_batches(batch_size=64, columns=columns):
            if limit <= 0:
                return
            table = transform(pa.Table.from_batches([chunk]).slice(0, limit))
            limit -= table.num_rows
            yield {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


def predict_validation(
    checkpoint: Path, data_root: Path | None = None, max_structures: int = MAX_STRUCTURES
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task ``(predicted, true)`` on the run's validation split: values for regression
    (energies for force tasks), zero-based class indices for classification."""
    import torch

    from matsci_ray.graphs.batching import rows_to_pyg_batch
    from matsci_ray.train.checkpoint import load_model

    model, config, _ = load_model(checkpoint)
    if data_root is not None:
        config.data.root = resolve(location(data_root))
    target = {n: t.value_target for n, t in model.tasks.items()}
    found: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {n: ([], []) for n in target}
    for dataset in model.datasets:  # one pass per data set scores all of its tasks
        names = [n for n, t in model.tasks.items() if t.dataset == dataset]
        targets = list(dict.fromkeys(target[n] for n in names))
        for rows in _val_rows(config, dataset, GEOMETRY + targets, max_structures):
            batch = rows_to_pyg_batch(rows, targets)
            with torch.no_grad():
                preds = model(batch, forces=False)  # energies only: no autograd needed
            for name in names:
                value, head = preds[name]["value"], model.head(name)
                value = head.predict(value)
                mask = batch[f"{target[name]}_mask"]
                found[name][0].append(value[mask].numpy())
                found[name][1].append(batch[target[name]][mask].numpy())
    return {n: (np.concatenate(p), np.concatenate(t)) for n, (p, t) in found.items() if p}


def parity_plot(trial: Trial, task: str, pred: np.ndarray, true: np.ndarray) -> str:
    spec = TASKS[task]
    target = spec.value_target
    unit = K.TARGETS[target].unit
    fig = new_figure(3.4, 3.2)
    ax = fig.subplots()
    ax.scatter(true, pred, s=6, alpha=0.6)
    low, high = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([low, high], [low, high], color="grey", lw=0.8)
    ax.set(
        title=f"{task} ({trial.column})",
        xlabel=f"true {target} ({unit})",
        ylabel=f"predicted ({unit})",
    )
    mae = float(np.abs(pred - true).mean())
    return figure_html(
        fig,
        f"parity plot of {task}, {trial.trial_id}",
        f"{trial.trial_id}: {len(true)} validation structures, MAE {mae:.4g} {unit}",
        "parity",
    )


def confusion_plot(trial: Trial, task: str, pred: np.ndarray, true: np.ndarray) -> str:
    """Counts over the classes present (in truth or prediction): 230 space groups would
    otherwise be an unreadable, nearly empty matrix."""
    spec = TASKS[task]
    classes = np.union1d(true.astype(int), pred.astype(int))
    index = {c: k for k, c in enumerate(classes.tolist())}
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    for t, p in zip(true.astype(int).tolist(), pred.astype(int).tolist(), strict=True):
        matrix[index[t], index[p]] += 1
    # space groups are stored zero-based; label them by their international number
    labels = (
        [str(c + 1) for c in classes]
        if spec.kind == "multiclass"
        else [("no", "yes")[c] for c in classes]
    )
    size = min(2.5 + 0.18 * len(classes), 12.0)
    fig = new_figure(size, size)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues", aspect="auto")
    if len(classes) <= 30:  # counts stay legible only on small matrices
        for (row, col), count in np.ndenumerate(matrix):
            if count:
                shade = "white" if count > matrix.max() / 2 else "black"
                ax.text(col, row, str(count), ha="center", va="center", fontsize=6, color=shade)
    ticks = range(len(classes))
    font = 8 if len(classes) <= 20 else 5
    ax.set_xticks(ticks, labels, rotation=90, fontsize=font)
    ax.set_yticks(ticks, labels, fontsize=font)
    ax.set(title=f"{task} ({trial.column})", xlabel="predicted", ylabel="true")
    accuracy = float((pred == true).mean())
    return figure_html(
        fig,
        f"confusion matrix of {task}, {trial.trial_id}",
        f"{trial.trial_id}: {len(true)} validation structures, {len(classes)} classes "
        f"present, accuracy {accuracy:.4g}",
        "confusion",
    )


def checkpoint_plots(
    trial: Trial, data_root: Path | None, max_structures: int
) -> tuple[list[str], list[str]]:
    """(parity figures, confusion figures) of one trial, or notes on why there are none."""
    classify = [TASKS[t].kind in ("binary", "multiclass") for t in trial.tasks]

    def skipped(why: str) -> tuple[list[str], list[str]]:
        said = [note(f"{trial.trial_id}: {why}")]  # under the plot kinds it would have had
        return (said if not all(classify) else []), (said if any(classify) else [])

    checkpoint = latest_checkpoint(trial.run_dir)
    if checkpoint is None:
        return skipped("no checkpoint, no parity plot or confusion matrix")
    try:
        scored = predict_validation(checkpoint, data_root, max_structures)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # missing data, old format
        return skipped(f"could not score {checkpoint}: {error}")
    parity: list[str] = []
    confusion: list[str] = []
    for task, is_class in zip(trial.tasks, classify, strict=True):
        plots = confusion if is_class else parity
        if task not in scored or not len(scored[task][1]):
            plots.append(note(f"{trial.trial_id}: {task}: no labelled validation structures"))
        else:
            plots.append((confusion_plot if is_class else parity_plot)(trial, task, *scored[task]))
    return parity, confusion


def _number(value: Any) -> float:
    """A CSV-ready record value as a float: blank (not reported, or no sd) is NaN."""
    return float(value) if value != "" else np.nan


def spread_chart(table: Table) -> str:
    """Bars of each cell's mean with ±sd error bars, one panel per row and task; pair tables
    put the single-task configuration it is compared with beside each bar (hatched). Empty
    when every cell is a single run: there is no spread to show, and the table has the values.
    """
    panels: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in table.records:
        panels.setdefault((record["row"], record["task"]), []).append(record)
    if not any(r["n"] > 1 or (r["single_task_n"] or 0) > 1 for r in table.records):
        return ""
    columns = 4 if len(panels) > 4 else len(panels)
    height = -(-len(panels) // columns)  # ceiling division: rows of panels
    fig = new_figure(2.8 * columns, 2.6 * height)
    for ax, ((row, task), records) in zip(
        fig.subplots(height, columns, squeeze=False).flat, panels.items(), strict=False
    ):
        _spread_panel(ax, task, row, records)
    for ax in fig.axes[len(panels) :]:
        ax.set_visible(False)  # the last row's unused panels
    fig.axes[0].legend(fontsize=6)
    return figure_html(
        fig,
        f"spread over seeds, {table.title}",
        f"{table.title}: mean ± sd over seeds (no bar: one run); hatched: single task",
        "spread",
    )


def _spread_panel(ax: Any, task: str, row: str, records: list[dict[str, Any]]) -> None:
    x = np.arange(len(records))
    pair = any(r["single_task_n"] != "" for r in records)
    width = 0.4 if pair else 0.7
    mean = [_number(r["mean"]) for r in records]
    sd = [_number(r["sd"]) for r in records]
    ax.bar(x, mean, width, yerr=sd, capsize=3, label="this table")
    if pair:
        base = [_number(r["single_task_mean"]) for r in records]
        base_sd = [_number(r["single_task_sd"]) for r in records]
        ax.bar(
            x + width,
            base,
            width,
            yerr=base_sd,
            capsize=3,
            hatch="//",
            fill=False,
            label="single task",
        )
    ax.set_xticks(x + (width / 2 if pair else 0), [r["column"] for r in records])
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    spec = TASKS[task]
    title = task if row == task else f"{task}\n({row})"
    ax.set_title(title, fontsize=7)
    ax.set_ylabel(f"{spec.metric} {spec.unit}".strip(), fontsize=7)


def _table_html(table: Table, plots: bool = True) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    notes = "".join(note(n) for n in table.notes)
    if not table.rows:
        notes = note("No trials.") + notes
    chart = spread_chart(table) if plots and table.key != "table-sweep" else ""
    return (
        f"<h3>{escape(table.title)}</h3>"
        f'<table id="{table.key}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        f"{notes}{chart}"
    )


def render_html(
    trials: list[Trial],
    tables: list[Table] | None = None,
    plots: bool = True,
    data_root: Path | None = None,
    max_structures: int = MAX_STRUCTURES,
) -> str:
    tables = build_tables(trials) if tables is None else tables
    curves: list[str] = []
    parity: list[str] = []
    confusion: list[str] = []
    if plots:
        for trial in trials:
            curves.append(learning_curves(trial))
            if trial.family == "sweep":
                continue  # sweeps can hold hundreds of trials: curves only
            more_parity, more_confusion = checkpoint_plots(trial, data_root, max_structures)
            parity += more_parity
            confusion += more_confusion
        parity = parity or [note("No regression tasks among the trials.")]
        confusion = confusion or [note("No classification tasks among the trials.")]
        if any(t.family == "sweep" for t in trials):
            parity.append(note("Sweep trials: learning curves only."))
    else:
        curves = parity = confusion = [note("Plots disabled (--no-plots).")]
    extra = left_out(trials)
    sections = [
        (
            "tables",
            "Tables",
            "".join(_table_html(t, plots) for t in tables) + (note(extra) if extra else ""),
        ),
        ("learning-curves", "Learning curves", "".join(curves)),
        ("parity", "Parity plots (validation split)", "".join(parity)),
        ("confusion", "Confusion matrices (validation split)", "".join(confusion)),
        *generative_sections(trials),
    ]
    nav = " · ".join(f'<a href="#{key}">{escape(title)}</a>' for key, title, _ in sections)
    body = "".join(
        f'<section id="{key}"><h2>{escape(title)}</h2>{content}</section>'
        for key, title, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>MatSciML report</title><style>{CSS}</style></head><body>"
        f"<h1>MatSciML report</h1><p>{len(trials)} trials.</p><nav>{nav}</nav>{body}"
        "</body></html>\n"
    )


def write_html(trials: list[Trial], out_dir: Path | str, **options: Any) -> Path:
    """Write ``out_dir/report.html``; ``options`` as for :func:`render_html`."""
    path = Path(out_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(trials, **options), encoding="utf-8")
    return path
