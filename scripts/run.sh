#!/usr/bin/env bash
# The main job: install what is needed, then run qprobes on the built-in
# guests: every instruction of qtest's targets probed under its self-check,
# then a trace of a real Linux guest (the default Debian cloud kernel,
# fetched and cached on first use) while it runs `cat /etc/hostname`.
# With arguments, runs `qprobes ARGS...` instead.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/install.sh"
venv=${QPROBES_VENV:-$repo/.venv}
if [ $# -gt 0 ]; then
    exec "$venv/bin/qprobes" "$@"
fi
"$venv/bin/qprobes" qtest
echo
# shellcheck disable=SC2016  # $retval is qprobes syntax, not shell
exec "$venv/bin/qprobes" trace \
    'p:myopen do_sys_openat2 path=+0(%si):string' \
    'r:myret do_sys_openat2 ret=$retval:s32' \
    -- cat /etc/hostname
