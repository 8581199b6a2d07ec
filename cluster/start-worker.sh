#!/usr/bin/env bash
# Join a bare machine to the Ray head started by cluster/start-head.sh (cluster/README.md).
# Arguments after HEAD are passed on to `ray start`. Needs the head's auth token (see --help).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'USAGE'
usage: cluster/start-worker.sh HEAD[:PORT] [RAY_START_ARGS...]

Joins this machine to the Ray cluster whose head is HEAD (GCS port 6379 unless given), with
the token the head wrote: copy the head's ~/.ray/auth_token here first (mode 0600).

environment:
  RAY_AUTH_TOKEN_PATH        the token file (default ~/.ray/auth_token)
  RAY_AUTH_TOKEN             the token itself, instead of a file
  MATSCI_RAY_AUTH            'token' (default) or 'off', as the head was started
  MATSCI_RAY_METRICS_PORT    Prometheus metrics port (default 8080)
  MATSCI_RAY_AGENT_PORT      dashboard agent HTTP port (default 52365)
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

setup_auth worker
keep_workers_alive
args=(--address "$head")
add_common_flags

ulimit -n 65536 2>/dev/null || true # Ray opens many sockets; best effort without root
exec ray start "${args[@]}" "$@"
