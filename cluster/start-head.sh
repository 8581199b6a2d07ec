#!/usr/bin/env bash
# Start the Ray head on a bare machine (cluster/README.md). Any arguments are passed on to
# `ray start`. Token authentication is on: the first start writes a token that workers and
# clients must hold. The dashboard and job API listen on 127.0.0.1 unless
# MATSCI_RAY_DASHBOARD_HOST says otherwise: whoever reaches them can run any code on the cluster.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<'USAGE'
usage: cluster/start-head.sh [RAY_START_ARGS...]

Starts a Ray head with token authentication: GCS on port 6379, dashboard and job API on 8265,
Prometheus metrics on 8080. The first start writes a random token to ~/.ray/auth_token (mode
0600); copy that file to every worker and client. Workers join with:
cluster/start-worker.sh THIS_HOST

environment:
  RAY_AUTH_TOKEN_PATH        the token file (default ~/.ray/auth_token; made if missing)
  RAY_AUTH_TOKEN             the token itself, instead of a file
  MATSCI_RAY_AUTH            'token' (default) or 'off': no authentication (warns)
  MATSCI_RAY_DASHBOARD_HOST  address the dashboard/job API binds (default 127.0.0.1; reach it
                             with `ssh -L 8265:127.0.0.1:8265 HEAD`, see cluster/README.md)
  MATSCI_RAY_PORT            GCS port (default 6379)
  MATSCI_RAY_DASHBOARD_PORT  dashboard and job API port (default 8265)
  MATSCI_RAY_METRICS_PORT    Prometheus metrics port (default 8080)
  MATSCI_RAY_CLIENT_PORT     Ray Client port (default 10001)
  MATSCI_RAY_AGENT_PORT      dashboard agent HTTP port (default 52365)
  DASHBOARD_METRIC_PORT      Ray's own: the dashboard's metrics port (default 44227)
  MATSCI_RAY_NUM_CPUS        CPUs to offer (default: Ray detects them)
  MATSCI_RAY_NUM_GPUS        GPUs to offer (default: Ray detects them)
  RAY_num_workers_soft_limit idle workers kept alive (default: 4 x CPUs, at least 16)
USAGE
}

# How workers and clients get the token: printed once per start, where the operator looks.
print_handoff() {
    local port="$1" file
    file="$(token_file)"
    [[ "$RAY_AUTH_MODE" == token ]] || return 0
    [[ -z "${RAY_AUTH_TOKEN:-}" ]] || file="(the RAY_AUTH_TOKEN you set)"
    cat >&2 <<HANDOFF
Ray token authentication is on; the token is in $file.
Copy it, mode 0600, to ~/.ray/auth_token on every worker and client machine (or anywhere, with
RAY_AUTH_TOKEN_PATH pointing at it), e.g. ssh WORKER mkdir -p .ray && scp -p $file WORKER:.ray/
  workers: cluster/start-worker.sh $(hostname):$port
  clients: export RAY_AUTH_MODE=token   (then ray job submit, ray.init, matsci-ray --address)
HANDOFF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

dashboard_host="${MATSCI_RAY_DASHBOARD_HOST:-127.0.0.1}"
dashboard_port="${MATSCI_RAY_DASHBOARD_PORT:-8265}"
if [[ "$dashboard_host" != "127.0.0.1" && "$dashboard_host" != "localhost" ]]; then
    echo "warning: the job API on ${dashboard_host}:${dashboard_port} runs any code it is sent;" \
        "expose it only on a trusted network or behind an authenticating proxy" >&2
fi

setup_auth head
keep_workers_alive
# Ray Train's placement-group cleaner asks the State API whether a trainer died; left to find
# it, it finds every Ray on the machine and gives up when there are two (a second cluster, a
# local session), and a stopped Tune trial's CPUs are never freed. Name this head's.
export RAY_API_SERVER_ADDRESS="http://127.0.0.1:${dashboard_port}"
gcs_port="${MATSCI_RAY_PORT:-6379}"
args=(--head --port "$gcs_port" --dashboard-host "$dashboard_host"
    --dashboard-port "$dashboard_port" --ray-client-server-port "${MATSCI_RAY_CLIENT_PORT:-10001}")
add_common_flags
print_handoff "$gcs_port"

ulimit -n 65536 2>/dev/null || true # Ray opens many sockets; best effort without root
exec ray start "${args[@]}" "$@"
