# shellcheck shell=bash
# Sourced by start-head.sh and start-worker.sh (not run on its own): what a head and a worker
# node set up alike before `ray start`. Each function exits 2 with one line on bad settings.

# The token every node and client shares (Ray reads RAY_AUTH_TOKEN first, then this file).
token_file() {
    echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
}

fail() {
    echo "error: $*" >&2
    exit 2
}

# Write a fresh 256-bit token to $1, readable by its owner only. noclobber: never replace a
# token that appeared meanwhile (workers and clients already hold the old one).
generate_token() {
    mkdir -p "$(dirname "$1")"
    (umask 077 && set -C && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$1")
    echo "generated a new Ray auth token in $1 (mode 0600)" >&2
}

# Refuse a token file that others can read, as ssh refuses such a key.
check_private() {
    local mode
    mode="$(stat -c %a "$1")"
    [[ "$mode" =~ ^[0-7]?[0-7]00$ ]] || fail "$1 has mode $mode: others can read the cluster's" \
        "token; run: chmod 600 $1"
}

# Turn on Ray's token authentication for this node and every process it starts, or off when
# MATSCI_RAY_AUTH=off. $1 is "head" (makes a token if none exists) or "worker" (needs one).
setup_auth() {
    case "${MATSCI_RAY_AUTH:-token}" in
        token) ;;
        off)
            echo "warning: MATSCI_RAY_AUTH=off: this Ray node accepts anyone who reaches its" \
                "ports (GCS, job API, Ray Client) and runs their code as $(id -un)" >&2
            export RAY_AUTH_MODE=disabled
            return
            ;;
        *) fail "MATSCI_RAY_AUTH must be 'token' (the default) or 'off', not '$MATSCI_RAY_AUTH'" ;;
    esac
    export RAY_AUTH_MODE=token
    if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
        return # given inline, e.g. from a Kubernetes Secret
    fi
    local file
    file="$(token_file)"
    if [[ ! -s "$file" ]]; then
        [[ "$1" == head ]] || fail "no Ray auth token at $file: copy the head's token file" \
            "there (mode 0600), or set RAY_AUTH_TOKEN_PATH to where it is"
        generate_token "$file"
    fi
    [[ -r "$file" ]] || fail "cannot read the Ray auth token at $file"
    check_private "$file"
    export RAY_AUTH_TOKEN_PATH="$file"
}

# Keep idle workers alive (see cluster/Dockerfile): a fresh one re-imports torch each epoch.
keep_workers_alive() {
    local cpus limit
    cpus="${MATSCI_RAY_NUM_CPUS:-$(nproc)}"
    limit=$((4 * cpus))
    export RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-$((limit > 16 ? limit : 16))}"
}

# Append the `ray start` flags both node kinds take from the environment to the caller's args.
add_common_flags() {
    args+=(--metrics-export-port "${MATSCI_RAY_METRICS_PORT:-8080}"
        --dashboard-agent-listen-port "${MATSCI_RAY_AGENT_PORT:-52365}")
    if [[ -n "${MATSCI_RAY_NUM_CPUS:-}" ]]; then args+=(--num-cpus "$MATSCI_RAY_NUM_CPUS"); fi
    if [[ -n "${MATSCI_RAY_NUM_GPUS:-}" ]]; then args+=(--num-gpus "$MATSCI_RAY_NUM_GPUS"); fi
}
