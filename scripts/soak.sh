#!/usr/bin/env bash
# The soak's long form: the suite's soak test (tests/integration/test_soak_linux.py:
# 30 probes on hot paths of a 2-vCPU Linux guest under a mixed workload, then
# detach and check the guest) run for --minutes instead of 2. Progress lines
# every 15 s, then one summary line ("soak: N s, 30 probes, H hits, ...").
#
#   scripts/soak.sh [--minutes 30] [pytest options...]
#   QPROBES_VENV   the virtual environment (default: REPO/.venv, made by scripts/install.sh)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
minutes=30
if [ "${1:-}" = "--minutes" ]; then
    minutes=${2:?--minutes wants a number}
    shift 2
fi
case $minutes in
    ''|*[!0-9.]*|.) echo "soak.sh: --minutes $minutes: want a number" >&2; exit 2 ;;
esac
venv=${QPROBES_VENV:-$repo/.venv}
cd "$repo"
export QPROBES_SOAK_SECONDS
QPROBES_SOAK_SECONDS=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')
echo "soak.sh: $minutes minutes ($(date -u +%Y-%m-%dT%H:%MZ))"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/integration/test_soak_linux.py "$@"
