#!/usr/bin/env bash
# Install what is needed, then run the whole test suite: fast unit tests and
# the integration tests that boot real QEMU guests. Extra arguments go to
# pytest (e.g. "tests/unit" or "-k paging").
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/install.sh"
venv=${QPROBES_VENV:-$repo/.venv}
cd "$repo"
# Every guest the tests need is installed above: a skipped VM test is a failure here.
export QPROBES_REQUIRE_VM=${QPROBES_REQUIRE_VM:-1}
exec "$venv/bin/python" -m pytest -ra "$@"
