#!/usr/bin/env bash
# Write a new random Ray auth token to FILE (mode 0600), for clusters whose nodes do not make
# their own: `ray up` (aws-gpu.yaml) and Kubernetes (a Secret). Keeps an existing FILE.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ $# -ne 1 || "$1" == -* ]]; then
    cat <<'USAGE'
usage: cluster/new-token.sh FILE

Writes a random 256-bit Ray auth token to FILE (mode 0600), or keeps FILE if it holds one.
Then: aws-gpu.yaml ships ~/.ray/matsci-ray-gpu.token to every node; for KubeRay,
  kubectl create secret generic matsci-ray-auth --from-file=auth_token=FILE
Clients use it with: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=FILE
USAGE
    [[ $# -eq 1 && ("$1" == -h || "$1" == --help) ]] && exit 0
    exit 2
fi

if [[ -s "$1" ]]; then
    echo "kept the Ray auth token already in $1" >&2
else
    generate_token "$1"
fi
check_private "$1"
