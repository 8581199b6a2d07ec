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
from matsci_ray.tasks.registry import TASKS, primary_metric

# Multi-data pairs of the MatSciML paper, and each data set's energy task.
DATASET_PAIRS = [
    ("oc20-s2ef", "materials-project"),
    ("oc20-s2ef", "lips"),
    ("oc20-is2re", "materials-project"),
    ("materials-project", "lips"),
]
ENERGY_TASK = {
    "oc20-s2ef": "s2ef-forces",
    "oc20-is2re": "is2re",
    "materials-project": "mp-formation-energy",
    "lips": "lips-forces",
    "oqmd": "oqmd-formation-energy",
    "nomad": "nomad-energy",
    "carolina-db": "cmd-formation-energy",
}
# width/depth of the sweep, per encoder's own parameter names
WIDTH = {"egnn": "hidden_dim", "megnet": "dim", "gala": "dim"}
DEPTH = {"egnn": "num_layers", "megnet": "num_blocks", "gala": "num_layers"}


def variants(study: StudyConfig) -> list[dict[str, Any]]:
    """The grid: one dict per trial with its label, tasks, model and loss combination."""
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
        for pair, model in itertools.product(study.dataset_pairs or DATASET_PAIRS, study.models):
            tasks = [ENERGY_TASK[d] for d in pair]
            out.append({"tasks": tasks, "model": model, "combine": None, "datasets": list(pair)})
    else:
        raise ValueError(f"{study.family} is searched, not gridded")
    for v in out:
        v["label"] = "_".join(v["tasks"]) + (f"-{v['combine']}" if v["combine"] else "")
        v["label"] += f"-{v['model']}"
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
    else:
        model = raw["model"]["name"]
        raw["name"] = f"{raw['name']}-{params['trial_id']}"
        raw["optim"]["lr"] = params["lr"]
        raw["data"]["cutoff"] = params["cutoff"]
        raw["model"]["params"] = {
            **raw["model"]["params"],
            WIDTH[model]: params["width"],
            DEPTH[model]: params["depth"],
        }
    return ExperimentConfig.model_validate(raw)


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


def build_tuner(study: StudyConfig) -> tune.Tuner:
    """A new Tuner for ``study``, or the interrupted one restored (unfinished trials rerun)."""
    base = dump_config(study.base)
    base["run"]["storage"] = str(study.base.run.storage / study.name / "runs")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base),
        # the trial only waits on its Train workers, which hold the CPUs (0 is refused)
        {"CPU": 0.01},
    )
    path = study.base.run.storage / study.name
    if tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(
            str(path), trainable, resume_unfinished=True, restart_errored=True
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
        run_config=tune.RunConfig(name=study.name, storage_path=str(study.base.run.storage)),
    )


def run_study(study: StudyConfig) -> Path:
    """Run (or resume) the study; write ``trials.jsonl`` for reports and return its path."""
    results = build_tuner(study).fit()
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
                "params": params.get("variant", params),
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
    out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return out
