#!/usr/bin/env bash
# Start the Ray head on a bare machine (cluster/README.md). Any arguments are passed on to
# `ray start`. The dashboard and job API listen on 127.0.0.1 unless MATSCI_RAY_DASHBOARD_HOST
# says otherwise: whoever reaches them can run any code on the cluster.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: cluster/start-head.sh [RAY_START_ARGS...]

Starts a Ray head: GCS on port 6379, dashboard and job API on 8265, Prometheus metrics on 8080.
Workers join with: cluster/start-worker.sh THIS_HOST

environment:
  MATSCI_RAY_DASHBOARD_HOST  address the dashboard/job API binds (default 127.0.0.1; reach it
                             with `ssh -L 8265:127.0.0.1:8265 HEAD`, see cluster/README.md)
  MATSCI_RAY_NUM_CPUS        CPUs to offer (default: Ray detects them)
  MATSCI_RAY_NUM_GPUS        GPUs to offer (default: Ray detects them)
  RAY_num_workers_soft_limit idle workers kept alive (default: 4 x CPUs, at least 16)
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

dashboard_host="${MATSCI_RAY_DASHBOARD_HOST:-127.0.0.1}"
if [[ "$dashboard_host" != "127.0.0.1" && "$dashboard_host" != "localhost" ]]; then
    echo "warning: the job API on ${dashboard_host}:8265 runs any code it is sent;" \
        "expose it only on a trusted network or behind an authenticating proxy" >&2
fi

# Keep idle workers alive (see cluster/Dockerfile): a fresh one re-imports torch each epoch.
cpus="${MATSCI_RAY_NUM_CPUS:-$(nproc)}"
limit=$((4 * cpus))
export RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-$((limit > 16 ? limit : 16))}"

args=(--head --port 6379 --dashboard-host "$dashboard_host" --dashboard-port 8265
    --metrics-export-port 8080)
if [[ -n "${MATSCI_RAY_NUM_CPUS:-}" ]]; then args+=(--num-cpus "$MATSCI_RAY_NUM_CPUS"); fi
if [[ -n "${MATSCI_RAY_NUM_GPUS:-}" ]]; then args+=(--num-gpus "$MATSCI_RAY_NUM_GPUS"); fi

ulimit -n 65536 2>/dev/null || true  # Ray opens many sockets; best effort without root
exec ray start "${args[@]}" "$@"
