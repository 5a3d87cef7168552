#!/usr/bin/env bash
# Install the system packages the test suite needs, only those that are missing. Idempotent.
set -euo pipefail

# command the tests look for -> Debian package that provides it
declare -A PACKAGES=(
    [redis-server]=redis-server
    [prometheus]=prometheus
    [promtool]=prometheus
    [amtool]=prometheus-alertmanager
    [git]=git  # the prompt registry tests make git repositories
)

missing=()
for cmd in "${!PACKAGES[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PACKAGES[$cmd]}")
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
# one package may provide several commands
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
echo "installing system packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
# kubectl (with kustomize, for tests/test_deploy_kubernetes.py) is not in Debian's main archive at a
# usable version; install it from https://kubernetes.io/docs/tasks/tools/ where those tests must run.
