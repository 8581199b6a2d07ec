"""Errors found before any Ray Train worker starts, and user errors that are not retried.

A typo in ``model.params`` fails at load time naming the field; a run asking for more than
the cluster holds fails at once; one that fits but is not free waits, then gives up after
``run.resource_timeout_s``; a config or data error raised in a worker ends the run on its
first attempt, whatever ``run.max_failures`` says.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray.train
import yaml

from matsci_ray import errors
from matsci_ray.cli.main import main
from matsci_ray.config import ExperimentConfig, load_config
from tests.samples import TINY_EGNN


def _raw(root: Path, tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "preflight",
        "tasks": ["mp-band-gap"],
        "data": {"root": str(root), "cutoff": 4.0, "cache_graphs": "never"},
        "model": {"name": "egnn", "params": dict(TINY_EGNN), "head_hidden": 16},
        "optim": {"epochs": 1},
        "run": {"num_workers": 1, "cpus_per_worker": 0.5, "storage": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return raw


def _write(tmp_path: Path, raw: dict[str, Any], name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _config(tmp_path: Path, **sections: dict[str, Any]) -> ExperimentConfig:
    # data.root need not exist: every check here runs before the data are opened
    return ExperimentConfig.model_validate(_raw(tmp_path / "no-data", tmp_path, **sections))


# --- model.params, at load time ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"hiden_dim": 64}, r"model\.params\.hiden_dim: egnn has no .*did you mean hidden_dim\?"),
        ({"hidden_dim": "big"}, r"model\.params\.hidden_dim: .*valid integer \(got 'big'\)"),
        ({"hidden_dim": True}, r"model\.params\.hidden_dim: .*valid integer"),
        ({"attention": 1}, r"model\.params\.attention: .*valid boolean"),
        ({"readout": "max"}, r"model\.params\.readout: .*'sum_mean', 'sum' or 'mean'"),
        ({"cutoff": 5.0}, r"model\.params\.cutoff: set by data\.cutoff"),
    ],
)
def test_bad_model_params_fail_at_load_naming_file_and_field(
    tmp_path: Path, params: dict[str, Any], message: str
) -> None:
    path = _write(tmp_path, _raw(tmp_path, tmp_path, model={"params": params}))
    with pytest.raises(errors.ConfigError, match=r"exp\.yaml: " + message):
        load_config(path)


def test_params_are_converted_to_the_encoders_types(tmp_path: Path) -> None:
    # YAML reads 1e-2 (no dot) as a string; an int where a float is annotated is that float
    raw = _raw(tmp_path, tmp_path, model={"params": {"aggr_norm": "1e-2", "hidden_dim": 8}})
    config = load_config(_write(tmp_path, raw))
    assert config.model.params == {"aggr_norm": 0.01, "hidden_dim": 8}
    gala = _raw(tmp_path, tmp_path, model={"name": "gala", "params": {"pair_cutoff": 3}})
    assert load_config(_write(tmp_path, gala)).model.params == {"pair_cutoff": 3.0}


def test_cli_reports_a_params_typo_in_one_line_before_ray_starts(tmp_path: Path) -> None:
    path = _write(tmp_path, _raw(tmp_path, tmp_path, model={"params": {"hiden_dim": 64}}))
    probe = (
        "import sys\n"
        "from matsci_ray.cli.main import main\n"
        f"code = main(['train', {str(path)!r}])\n"
        "print(code, 'ray' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    code, ray_loaded = done.stdout.split()
    assert (code, ray_loaded) == ("2", "False"), done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"matsci-ray train: error: {path}: model.params.hiden_dim: egnn has no parameter "
        "'hiden_dim'; did you mean hidden_dim?"
    ]


# --- before the workers start: build_trainer's first step ------------------------------------


def test_params_the_encoder_refuses_fail_before_data_or_workers(
    ray_local: None, tmp_path: Path
) -> None:
    from matsci_ray.train.trainer import build_trainer

    config = _config(tmp_path, model={"name": "gala", "params": {"dim": 30, "heads": 4}})
    with pytest.raises(errors.ConfigError, match="dim 30 is not divisible by heads 4"):
        build_trainer(config)


@pytest.mark.timeout(60)
def test_more_workers_than_the_cluster_holds_fail_at_once_in_one_line(
    ray_local: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(tmp_path / "no-data", tmp_path, run={"num_workers": 4, "cpus_per_worker": 1})
    start = time.monotonic()
    code = main(["train", str(_write(tmp_path, raw))])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [
        "matsci-ray train: error: run asks for 4 workers x 1 CPU (4 CPU in all); the cluster "
        "has 2 CPU on 1 node(s) (largest 2 CPU), room for 2 such worker(s): lower "
        "run.num_workers or run.cpus_per_worker, or add nodes"
    ]
    assert time.monotonic() - start < 30


def test_a_gpu_on_a_cluster_without_gpus_fails_at_once(ray_local: None, tmp_path: Path) -> None:
    from matsci_ray.train.preflight import check_resources

    with pytest.raises(errors.ResourceError, match=r"1 worker x 0\.5 CPU \+ 1 GPU.* 0 GPU"):
        check_resources(_config(tmp_path, run={"use_gpu": True}))


def test_workers_on_every_cpu_leave_none_for_ray_data(ray_local: None, tmp_path: Path) -> None:
    from matsci_ray.train.preflight import check_resources

    # they fit, but Ray Data's read and graph tasks would never start: a hang, not a run
    with pytest.raises(errors.ResourceError, match=r"2 CPU leaves 0 of .*data\.task_cpus 0\.5"):
        check_resources(_config(tmp_path, run={"num_workers": 2, "cpus_per_worker": 1}))


def test_an_autoscalers_node_types_count_as_capacity() -> None:
    from matsci_ray.train.preflight import autoscaler_fit, cluster_cpus, workers_that_fit

    # cluster/aws-gpu.yaml: a CPU head up now, up to 2 single-GPU workers on demand
    head, gpu_node = {"CPU": 4.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}
    bundle = {"CPU": 2.0, "GPU": 1.0}
    assert workers_that_fit(bundle, [head]) == 0
    assert autoscaler_fit(bundle, [(head, 1), (gpu_node, 2)]) == 2
    assert cluster_cpus([head], [(head, 1), (gpu_node, 2)]) == 20


def _hold_cpus(amount: float) -> Any:
    from ray.util.placement_group import placement_group

    group = placement_group([{"CPU": amount}])
    assert group.wait(timeout_seconds=30)
    return group


# 2 x 0.5 CPU fits the 2-CPU cluster with room for Ray Data, but not beside another job's 1.5
BUSY = {"num_workers": 2, "cpus_per_worker": 0.5}


@pytest.mark.timeout(60)
def test_a_wait_for_busy_cpus_gives_up_after_the_timeout(
    ray_local: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    from matsci_ray.train.preflight import check_resources

    config = _config(tmp_path, run={**BUSY, "resource_timeout_s": 3})
    holder = _hold_cpus(1.5)
    try:
        start = time.monotonic()
        with pytest.raises(errors.ResourceError, match=r"2 workers x 0\.5 CPU.*not free after 3 s"):
            check_resources(config)
        assert 3 <= time.monotonic() - start < 20
        assert "waiting for 2 workers x 0.5 CPU (1 CPU in all) to come free" in caplog.text
        assert "resource_timeout_s" in caplog.text
    finally:
        remove_placement_group(holder)
    # the probe's own reservation went with it: both CPUs come back
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2


@pytest.mark.timeout(60)
def test_a_wait_ends_when_the_cpus_come_free(ray_local: None, tmp_path: Path) -> None:
    from ray.util.placement_group import remove_placement_group

    from matsci_ray.train.preflight import check_resources

    config = _config(tmp_path, run={**BUSY, "resource_timeout_s": 30})
    holder = _hold_cpus(1.5)
    threading.Timer(1.5, remove_placement_group, args=(holder,)).start()
    start = time.monotonic()
    check_resources(config)
    assert 1.5 <= time.monotonic() - start < 25


class _Trial:
    def check(self, config: ExperimentConfig) -> str:
        from matsci_ray.train.preflight import check_resources

        try:
            check_resources(config)
        except errors.ResourceError as error:
            return str(error)
        return "ok"


@pytest.mark.timeout(60)
def test_inside_a_trial_capacity_counts_not_what_siblings_hold(
    ray_local: None, tmp_path: Path
) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    # as a Tune trial: an actor holding a sliver of CPU itself
    trial = ray.remote(num_cpus=0.01)(_Trial).remote()
    sibling = _hold_cpus(1.5)  # a sibling trial's workers
    try:
        # fits once the sibling finishes: no wait, no error (Tune and Ray Train queue it)
        fits = _config(tmp_path, run={**BUSY, "resource_timeout_s": 0})
        assert ray.get(trial.check.remote(fits), timeout=30) == "ok"
        # 2 x 1 CPU never fits beside the trial's own 0.01 CPU on a 2-CPU cluster
        never = _config(tmp_path, run={"num_workers": 2, "cpus_per_worker": 1})
        assert "room for 1 such worker" in ray.get(trial.check.remote(never), timeout=30)
    finally:
        remove_placement_group(sibling)
        ray.kill(trial)


def test_the_worker_start_timeout_is_handed_to_ray_trains_controller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run.worker_start_timeout_s`` goes into the driver's environment under the name Ray
    Train reads, one of those it hands on to its controller (a renamed variable fails here)."""
    from ray.train.v2._internal import constants

    from matsci_ray.train.trainer import set_controller_env

    name = constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    monkeypatch.setenv(name, "60")  # restored after the test
    set_controller_env(_config(tmp_path, run={"worker_start_timeout_s": 12.5}))
    assert os.environ[name] == "12.5" and name in constants.ENV_VARS_TO_PROPAGATE
    set_controller_env(_config(tmp_path))
    assert os.environ[name] == "60"  # Ray's default, whatever an earlier run set


# --- a user error raised in a worker is not retried ------------------------------------------


def _bad_shard(loop_config: dict[str, Any]) -> None:
    """A training function whose every attempt leaves a marker and then meets a data error."""
    attempts = Path(loop_config["attempts"])
    attempts.mkdir(exist_ok=True)
    (attempts / f"{time.time_ns()}").touch()
    raise errors.ShardError("data/mp/train/part-0.parquet: truncated (4096 of 9000 bytes)")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_data_error_in_a_worker_ends_the_run_on_its_first_attempt(
    ray_local: None, tmp_path: Path
) -> None:
    from ray.train.torch import TorchTrainer

    from matsci_ray.train.preflight import prepare_run

    config = _config(tmp_path)
    trainer = TorchTrainer(
        _bad_shard,
        train_loop_config={"attempts": str(tmp_path / "attempts")},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="bad-shard",
            storage_path=str(tmp_path / "runs"),
            failure_config=ray.train.FailureConfig(max_failures=2),
            callbacks=prepare_run(config),
        ),
    )
    with pytest.raises(Exception) as info:
        trainer.fit()
    assert len(list((tmp_path / "attempts").iterdir())) == 1  # max_failures 2, yet no retry
    found = errors.user_facing(info.value)  # what the CLI prints, exit 2
    assert isinstance(found, errors.ShardError), repr(info.value)
    assert errors.one_line(found) == "data/mp/train/part-0.parquet: truncated (4096 of 9000 bytes)"


@pytest.fixture(scope="module")
def mp_root(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.samples import ingest_in_process

    root = tmp_path_factory.mktemp("mp")
    return ingest_in_process(
        "materials-project", samples / "materials_project" / "summary_docs.jsonl", root
    )


def test_every_trainer_ends_its_run_on_a_user_error(
    ray_local: None, mp_root: Path, tmp_path: Path
) -> None:
    from matsci_ray.train.preflight import StopOnUserError
    from matsci_ray.train.trainer import build_trainer

    config = ExperimentConfig.model_validate(_raw(mp_root, tmp_path))
    trainer = build_trainer(config, callbacks=[])
    assert [type(c) for c in trainer.run_config.callbacks] == [StopOnUserError]
