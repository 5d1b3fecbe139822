#!/usr/bin/env bash
# Install what is needed, then run the whole test suite: fast unit tests and
# the integration tests that boot real QEMU guests. Extra arguments go to
# pytest (e.g. "tests/unit" or "-k paging") and run it once, as given.
#
# With no arguments the suite runs in two parts: every test not marked
# "serial" on QPROBES_TEST_JOBS pytest-xdist workers (default 2, one guest
# each), then the "serial" ones (timing-sensitive, or busy on 2 vCPUs) alone.
# QPROBES_TEST_JOBS=1 runs everything in one serial pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/install.sh"
venv=${QPROBES_VENV:-$repo/.venv}
cd "$repo"
# Every guest the tests need is installed above: a skipped VM test is a failure here.
export QPROBES_REQUIRE_VM=${QPROBES_REQUIRE_VM:-1}
jobs=${QPROBES_TEST_JOBS:-2}
if [ $# -gt 0 ] || [ "$jobs" = 1 ]; then
    exec "$venv/bin/python" -m pytest -ra "$@"
fi
status=0
"$venv/bin/python" -m pytest -ra -n "$jobs" -m "not serial" || status=$?
"$venv/bin/python" -m pytest -ra -m serial || { s=$?; [ "$status" = 0 ] && status=$s; }
exit "$status"
