"""What the driver checks before any Ray Train worker starts, and what ends a run at once.

Ray Train learns of a bad model parameter only inside a worker, after its start-up, and then
retries it under ``max_failures``; a request for more CPUs than any node has leaves its
placement group pending for ever. :func:`prepare_run` (called first by ``build_trainer``, so
by ``matsci-ray train``, the job entrypoints and every Tune trial) instead:

- builds the encoder from ``model`` (on torch's meta device: no weights allocated), so a
  value the encoder refuses fails before any worker starts;
- compares the workers asked for with the cluster: a request no set of nodes can ever hold
  (each worker on one node; an autoscaler's node types count) is a :class:`ResourceError` at
  once, and so is one that leaves Ray Data no CPU to read and build graphs with; one that
  fits but is not free now (other jobs, nodes still starting) waits, saying for what, and
  gives up after ``run.resource_timeout_s``. An elastic run (``run.num_workers: [MIN, MAX]``)
  needs room for MIN workers, and Ray Data needs room beside as many as fit up to MAX;
- adds :class:`StopOnUserError` to the run's callbacks: a :class:`MatSciError` raised in a
  worker (a config or data error) ends the run at once instead of being retried.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import ray
import ray.train
import torch
from ray.util.placement_group import placement_group, remove_placement_group

from matsci_ray.config import ExperimentConfig
from matsci_ray.errors import ResourceError, user_facing
from matsci_ray.models import build_encoder
from matsci_ray.ray_env import init_ray

logger = logging.getLogger(__name__)

# Resources a worker bundle may ask for; others (memory, node:<ip>) are not compared.
COMPARED = ("CPU", "GPU")
# How often a wait for free resources says that it is still waiting.
WAIT_LOG_INTERVAL_S = 30.0
# How long the probe may take to be placed before the wait is announced: even on free
# resources, placing it is a round trip through the GCS (slow on a loaded machine).
QUIET_WAIT_S = 5.0
# The least the probe is given, even with run.resource_timeout_s 0 (what is free now).
MIN_PROBE_S = 1.0
# An autoscaler node type without a maximum count.
UNBOUNDED = 1 << 30
# run.placement -> Ray's placement-group strategy. SPREAD is best effort: workers share a node
# only when too few nodes are free, which an elastic run needs to place what it can.
PLACEMENT = {"pack": "PACK", "spread": "SPREAD"}
# Ray accounts resources in steps of 1e-4: a 0.5-CPU worker fits 4 times on 2 CPUs exactly.
_EPS = 1e-6


class StopOnUserError(ray.train.UserCallback):
    """Ends a run when a worker raised a :class:`MatSciError` (a bad config, a corrupt shard):
    retrying it under ``max_failures`` would fail the same way each time.

    Ray Train's controller calls this after every poll that found worker errors, before its
    failure policy decides on a retry. An exception raised here fails that controller step,
    which the policy never retries; the driver gets a ``ControllerError`` holding the
    MatSciError (``errors.user_facing`` finds it there).
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for _rank, error in sorted(worker_exceptions.items()):
            known = user_facing(error)
            if known is not None:
                raise known


def prepare_run(config: ExperimentConfig, callbacks: list[Any] | None = None) -> list[Any]:
    """Check ``config`` against its encoder and the cluster (see module docstring) and return
    the run's Ray Train ``callbacks`` with :class:`StopOnUserError` added."""
    check_model(config)
    init_ray()  # joins a running Ray; else starts one, as Ray Data would on first use
    check_resources(config)
    return [*(callbacks or []), StopOnUserError()]


def check_model(config: ExperimentConfig) -> None:
    """Build the encoder once on the driver: values that pass their types but not the encoder
    (GALA's ``dim`` not divisible by ``heads``) fail here, not in every worker."""
    with torch.device("meta"):
        build_encoder(config.model.name, config.data.cutoff, config.model.params)


def worker_bundle(config: ExperimentConfig) -> dict[str, float]:
    """What one Ray Train worker asks for (as ``build_trainer`` passes it to Ray Train)."""
    bundle = {"CPU": config.run.cpus_per_worker}
    if config.run.use_gpu:
        bundle["GPU"] = 1.0
    return bundle


def check_resources(config: ExperimentConfig) -> None:
    """Fail at once if the workers can never be placed, or would leave Ray Data no CPU;
    otherwise wait (on the driver) until they can be placed, up to ``run.resource_timeout_s``.

    "Never" counts the nodes there are and those an autoscaler may add. Inside a Ray actor
    (a Tune trial) there is no wait, and capacity is less what the trial itself holds: sibling
    trials hold CPUs in turn and Tune and Ray Train queue a trial until they are free, so
    waiting on them here would fail trials that would have run.
    """
    bundle, count = worker_bundle(config), config.run.min_workers
    nodes, groups = node_capacities(), autoscaler_nodes()
    fit = max(workers_that_fit(bundle, nodes), autoscaler_fit(bundle, groups))
    if fit < count:
        raise ResourceError(f"{describe(count, bundle)}; {describe_cluster(bundle, nodes, fit)}")
    check_room_for_data(config, cluster_cpus(nodes, groups), min(fit, config.run.max_workers))
    if not _inside_actor():
        strategy = PLACEMENT[config.run.placement]
        wait_until_free(count, bundle, config.run.resource_timeout_s, nodes, strategy)


def node_capacities() -> list[dict[str, float]]:
    """Each alive node's total resources (free or not), less what this process holds itself
    when it runs in a Ray actor or task (a Tune trial's own CPU share)."""
    own: dict[str, float] = {}
    own_node = None
    if _inside_actor():
        context = ray.get_runtime_context()
        own, own_node = context.get_assigned_resources(), context.get_node_id()
    capacities = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        held = own if node.get("NodeID") == own_node else {}
        resources = node.get("Resources", {})
        capacities.append({k: resources.get(k, 0.0) - held.get(k, 0.0) for k in COMPARED})
    return capacities


def workers_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers of ``bundle`` the ``nodes`` hold together, each worker on one node."""
    return sum(_fit_on_node(bundle, node) for node in nodes)


def _fit_on_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    counts = [
        math.floor(node.get(k, 0.0) / amount + _EPS) for k, amount in bundle.items() if amount > 0
    ]
    return max(0, min(counts, default=0))


def autoscaler_nodes() -> list[tuple[dict[str, float], int]]:
    """The node types an autoscaler may start: one node's resources and how many it may
    start at most (:data:`UNBOUNDED` for no limit); none without an autoscaler."""
    try:  # Ray Train's own resource check reads the same record (a private API)
        from ray._private.state import state

        cluster_config = state.get_cluster_config()
    except Exception:
        return []
    if cluster_config is None:
        return []
    return [
        (
            {k: float(group.resources.get(k, 0)) for k in COMPARED},
            UNBOUNDED if group.max_count < 0 else group.max_count,
        )
        for group in cluster_config.node_group_configs
    ]


def autoscaler_fit(bundle: dict[str, float], groups: list[tuple[dict[str, float], int]]) -> int:
    """Workers of ``bundle`` the autoscaler's node types hold at their maximum counts."""
    return sum(_fit_on_node(bundle, node) * count for node, count in groups)


def cluster_cpus(
    nodes: list[dict[str, float]], groups: list[tuple[dict[str, float], int]]
) -> float:
    """The CPUs the cluster has or an autoscaler may bring, whichever is more."""
    now = sum(node.get("CPU", 0.0) for node in nodes)
    return max(now, sum(node.get("CPU", 0.0) * count for node, count in groups))


def check_room_for_data(config: ExperimentConfig, total: float, count: int | None = None) -> None:
    """Ray Data's read and graph tasks (``data.task_cpus`` each) run beside the ``count``
    workers (default: the most the run asks for), on what they leave of the cluster's
    ``total`` CPUs: with less than one task's share left, Ray Data starts no task and the
    workers wait for their first batch for ever (cached graphs too)."""
    count = config.run.max_workers if count is None else count
    workers = count * config.run.cpus_per_worker
    if total - workers + _EPS < config.data.task_cpus:
        raise ResourceError(
            f"run.num_workers x run.cpus_per_worker = {workers:g} CPU leaves {total - workers:g} "
            f"of the cluster's {total:g} CPU for Ray Data's read and graph tasks "
            f"(data.task_cpus {config.data.task_cpus:g} each): training would wait for data "
            "for ever; lower run.cpus_per_worker or data.task_cpus"
        )


def wait_until_free(
    count: int,
    bundle: dict[str, float],
    timeout_s: float,
    nodes: list[dict[str, float]],
    strategy: str = "PACK",
) -> None:
    """Reserve the workers' resources the way Ray Train does (a placement group of the
    run's strategy), release them at once, and give up after ``timeout_s``."""
    group = placement_group([dict(bundle)] * count, strategy=strategy)
    started = time.monotonic()
    try:
        if group.wait(timeout_seconds=max(min(QUIET_WAIT_S, timeout_s / 2), MIN_PROBE_S)):
            return
        while True:
            waited = time.monotonic() - started
            # said before giving up too: on a loaded machine the quiet probe alone can outlast
            # a short timeout, and the wait must still be seen
            logger.warning(
                "waiting for %s to come free (%s); giving up in %.0f s (run.resource_timeout_s)",
                describe(count, bundle, asks=False),
                describe_free(bundle, nodes),
                max(timeout_s - waited, 0.0),
            )
            if waited >= timeout_s:
                raise ResourceError(
                    f"{describe(count, bundle)}: not free after {waited:.0f} s "
                    f"(run.resource_timeout_s {timeout_s:g}); {describe_free(bundle, nodes)}"
                )
            if group.wait(timeout_seconds=min(WAIT_LOG_INTERVAL_S, timeout_s - waited)):
                return
    finally:
        remove_placement_group(group)


def describe(count: int, bundle: dict[str, float], asks: bool = True) -> str:
    each = " + ".join(f"{amount:g} {k}" for k, amount in bundle.items())
    total = ", ".join(f"{count * amount:g} {k}" for k, amount in bundle.items())
    text = f"{count} worker{'s' if count > 1 else ''} x {each} ({total} in all)"
    return f"run asks for {text}" if asks else text


def describe_cluster(bundle: dict[str, float], nodes: list[dict[str, float]], fit: int) -> str:
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in bundle}
    have = ", ".join(f"{totals[k]:g} {k}" for k in bundle)
    biggest = ", ".join(f"{largest[k]:g} {k}" for k in bundle)
    return (
        f"the cluster has {have} on {len(nodes)} node(s) (largest {biggest}), room for {fit} "
        "such worker(s): lower run.num_workers or run.cpus_per_worker, or add nodes"
    )


def describe_free(bundle: dict[str, float], nodes: list[dict[str, float]]) -> str:
    free = ray.available_resources()
    parts = [
        f"{free.get(k, 0.0):g} of {sum(n.get(k, 0.0) for n in nodes):g} {k} free" for k in bundle
    ]
    return ", ".join(parts) + " now"


def _inside_actor() -> bool:
    """Whether this code runs in a Ray actor (a Tune trial) rather than a driver."""
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


__all__ = [
    "StopOnUserError",
    "check_model",
    "check_resources",
    "prepare_run",
    "worker_bundle",
]
