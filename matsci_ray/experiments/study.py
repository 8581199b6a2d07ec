"""Experiment families as Ray Tune experiments: each trial is a Ray Train run.

Families: ``single-task`` (Table 3: task × model), ``task-pair`` (Table 4: MP task pairs ×
{additive, PCGrad} × model), ``dataset-pair`` (Table 5: data-set pairs × model, one energy
task per data set) and ``sweep`` (Optuna search with ASHA early stopping).

Ray 2.60 runs Train V2, where a ``TorchTrainer`` is not a Tune trainable: a Tune *function*
trial builds the trainer, and ``TuneReportCallback`` forwards every epoch's report to Tune (so
ASHA can stop a trial early). An interrupted study resumes with ``Tuner.restore``; a trial's
Train run resumes from its own latest checkpoint (same name and storage path).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from matsci_ray.config import ExperimentConfig, StudyConfig, dump_config
from matsci_ray.data.registry import energy_task, paper_pairs
from matsci_ray.models import model_spec
from matsci_ray.storage import Location, ray_storage, write_text
from matsci_ray.tasks.registry import TASKS, primary_metric


def variants(study: StudyConfig) -> list[dict[str, Any]]:
    """The grid: one dict per trial with its label, tasks, model, loss combination and run
    seed. Seeds vary slowest, so an interrupted study has every cell's first seed first."""
    cells = _cells(study)
    out = [{**cell, "seed": seed} for seed in study.seeds or [] for cell in cells]
    for v in out:
        v["label"] = "_".join(v["tasks"]) + (f"-{v['combine']}" if v["combine"] else "")
        v["label"] += f"-{v['model']}-seed{v['seed']}"
    return out


def _cells(study: StudyConfig) -> list[dict[str, Any]]:
    """One dict per table cell: tasks, model and loss combination (data sets for pairs)."""
    out: list[dict[str, Any]] = []
    if study.family == "single-task":
        for task, model in itertools.product(study.tasks or list(TASKS), study.models):
            out.append({"tasks": [task], "model": model, "combine": None})
    elif study.family == "task-pair":
        mp = [t for t, spec in TASKS.items() if spec.dataset == "materials-project"]
        pairs = study.task_pairs or list(itertools.combinations(mp, 2))
        for pair, combine, model in itertools.product(pairs, study.combine, study.models):
            out.append({"tasks": list(pair), "model": model, "combine": combine})
    elif study.family == "dataset-pair":
        for pair, model in itertools.product(study.dataset_pairs or paper_pairs(), study.models):
            tasks = [energy_task(d) for d in pair]
            out.append({"tasks": tasks, "model": model, "combine": None, "datasets": list(pair)})
    else:
        raise ValueError(f"{study.family} is searched, not gridded")
    return out


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> ExperimentConfig:
    """Apply a variant (grid) or a sampled point (sweep) to the base experiment."""
    raw = json.loads(json.dumps(base))  # deep copy of plain data
    if "variant" in params:
        variant = params["variant"]
        raw["name"] = f"{raw['name']}-{variant['label']}"
        raw["tasks"] = variant["tasks"]
        if variant["model"] != raw["model"]["name"]:
            raw["model"] = {**raw["model"], "name": variant["model"], "params": {}}
        if variant["combine"]:
            raw["loss"]["combine"] = variant["combine"]
        if "seed" in variant:  # variants of studies started before seeds keep the base's
            raw["run"]["seed"] = variant["seed"]
    else:
        spec = model_spec(raw["model"]["name"])
        raw["name"] = f"{raw['name']}-{params['trial_id']}"
        raw["optim"]["lr"] = params["lr"]
        raw["data"]["cutoff"] = params["cutoff"]
        raw["model"]["params"] = {
            **raw["model"]["params"],
            spec.width: params["width"],
            spec.depth: params["depth"],
        }
    return ExperimentConfig.model_validate(raw)


def swept(model: str, params: dict[str, Any]) -> dict[str, Any]:
    """A sweep trial's sampled point with width and depth under the encoder's own argument
    names (``hidden_dim``, ``num_blocks``...), as the report shows them."""
    spec = model_spec(model)
    names = {"width": spec.width, "depth": spec.depth}
    return {names.get(key, key): value for key, value in params.items()}


def run_trial(params: dict[str, Any], base: dict[str, Any]) -> None:
    """The Tune function trial: one Ray Train run, every epoch reported to Tune."""
    from matsci_ray.train.trainer import build_trainer

    params = {**params, "trial_id": tune.get_context().get_trial_id()}
    config = trial_config(base, params)
    result = build_trainer(config, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error


def _param_space(study: StudyConfig) -> dict[str, Any]:
    if study.family != "sweep":
        return {"variant": tune.grid_search(variants(study))}
    s = study.sweep
    return {
        "lr": tune.loguniform(*s.lr),
        "width": tune.choice(s.width),
        "depth": tune.choice(s.depth),
        "cutoff": tune.uniform(*s.cutoff),
    }


def build_tuner(study: StudyConfig, verbose: bool = False) -> tune.Tuner:
    """A new Tuner for ``study``, or the interrupted one restored (unfinished trials rerun).

    Tune's own reporter prints a status block and every trial's config and result; unless
    ``verbose``, a table of trials (:class:`~matsci_ray.console.study.StudyConsole`) does
    instead. A restored Tuner keeps the console it was created with (Tune pickles it)."""
    base = dump_config(study.base)
    base["run"]["storage"] = str(study.base.run.storage / study.name / "runs")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base),
        # the trial only waits on its Train workers, which hold the CPUs (0 is refused)
        {"CPU": 0.01},
    )
    where = ray_storage(study.base.run.storage / study.name)
    path, fs = where["storage_path"], where.get("storage_filesystem")
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        return tune.Tuner.restore(
            path, trainable, resume_unfinished=True, restart_errored=True, storage_filesystem=fs
        )
    metric, higher = primary_metric(study.base.tasks)
    tune_config = tune.TuneConfig(max_concurrent_trials=study.max_concurrent_trials)
    if study.family == "sweep":
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        mode = "max" if higher else "min"
        tune_config = tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=study.sweep.num_samples,
            search_alg=OptunaSearch(seed=study.base.run.seed),
            scheduler=ASHAScheduler(
                max_t=study.base.optim.epochs,
                grace_period=study.sweep.grace_period,
                reduction_factor=study.sweep.reduction_factor,
            ),
            max_concurrent_trials=study.max_concurrent_trials,
        )
    return tune.Tuner(
        trainable,
        param_space=_param_space(study),
        tune_config=tune_config,
        run_config=_run_config(study, metric, verbose),
    )


def _run_config(study: StudyConfig, metric: str, verbose: bool) -> tune.RunConfig:
    storage = ray_storage(study.base.run.storage)
    if verbose:
        return tune.RunConfig(name=study.name, **storage)
    from matsci_ray.console.study import StudyConsole

    table = StudyConsole(study.name, metric, study.base.optim.epochs)
    return tune.RunConfig(name=study.name, **storage, verbose=0, callbacks=[table])


def run_study(study: StudyConfig, verbose: bool = False) -> Location:
    """Run (or resume) the study; write ``trials.jsonl`` for reports and return its path."""
    results = build_tuner(study, verbose).fit()
    base = dump_config(study.base)
    base["run"]["storage"] = str(study.base.run.storage / study.name / "runs")
    rows = []
    for result in results:
        params = dict(result.config or {})
        trial_id = str((result.metrics or {}).get("trial_id", Path(result.path).name))
        config = trial_config(base, {**params, "trial_id": trial_id})
        rows.append(
            {
                "trial_id": trial_id,
                "family": study.family,
                "tasks": config.tasks,
                "datasets": config.datasets,
                "model": config.model.name,
                "combine": config.loss.combine if study.family == "task-pair" else None,
                "seed": config.run.seed,
                "params": params.get("variant") or swept(config.model.name, params),
                "run_dir": str(config.run.storage / config.name),
                "metrics": {
                    k: v
                    for k, v in (result.metrics or {}).items()
                    if isinstance(v, int | float) and ("/" in k or k == "epoch")
                },
                "error": str(result.error) if result.error else None,
            }
        )
    out = study.base.run.storage / study.name / "trials.jsonl"
    write_text(out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return out
