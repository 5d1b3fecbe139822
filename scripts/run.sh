#!/usr/bin/env bash
# The main job: install what is needed, then run qprobes on the built-in
# default guest. Extra arguments are passed to the qprobes command.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/install.sh"
venv=${QPROBES_VENV:-$repo/.venv}
if [ $# -eq 0 ]; then
    set -- qtest
fi
exec "$venv/bin/qprobes" "$@"
