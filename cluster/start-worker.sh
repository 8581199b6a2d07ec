#!/usr/bin/env bash
# Join a bare machine to the Ray head started by cluster/start-head.sh (cluster/README.md).
# Arguments after HEAD are passed on to `ray start`.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: cluster/start-worker.sh HEAD[:PORT] [RAY_START_ARGS...]

Joins this machine to the Ray cluster whose head is HEAD (GCS port 6379 unless given).

environment:
  MATSCI_RAY_NUM_CPUS        CPUs to offer (default: Ray detects them)
  MATSCI_RAY_NUM_GPUS        GPUs to offer (default: Ray detects them)
  RAY_num_workers_soft_limit idle workers kept alive (default: 4 x CPUs, at least 16)
USAGE
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0
    exit 2
fi

head="$1"
shift
[[ "$head" == *:* ]] || head="${head}:6379"

# Keep idle workers alive (see cluster/Dockerfile): a fresh one re-imports torch each epoch.
cpus="${MATSCI_RAY_NUM_CPUS:-$(nproc)}"
limit=$((4 * cpus))
export RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-$((limit > 16 ? limit : 16))}"

args=(--address "$head" --metrics-export-port 8080)
if [[ -n "${MATSCI_RAY_NUM_CPUS:-}" ]]; then args+=(--num-cpus "$MATSCI_RAY_NUM_CPUS"); fi
if [[ -n "${MATSCI_RAY_NUM_GPUS:-}" ]]; then args+=(--num-gpus "$MATSCI_RAY_NUM_GPUS"); fi

ulimit -n 65536 2>/dev/null || true  # Ray opens many sockets; best effort without root
exec ray start "${args[@]}" "$@"
