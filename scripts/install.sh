#!/usr/bin/env bash
# Install everything qprobes needs on Debian 12 (run as root, or in the Docker
# image): QEMU, gdb, the tools that build the qtest kernel and the default
# Linux guest's initramfs, and a Python virtual environment with qprobes.
# Idempotent: what is already there is not installed again.
#
#   QPROBES_VENV   where the virtual environment goes (default: REPO/.venv)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QPROBES_VENV:-$repo/.venv}

# command -> Debian package
declare -A need=(
    [qemu-system-x86_64]=qemu-system-x86
    [gdb]=gdb
    [gcc]=gcc
    [make]=make
    [ld]=binutils
    [cpio]=cpio
    [git]=git
)
missing=()
for cmd in "${!need[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "qprobes install: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "qprobes install: creating $venv"
    python3 -m venv "$venv"
fi
stamp="$venv/.qprobes-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    echo "qprobes install: pip install -e ${repo}[test]"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "${repo}[test]"
    touch "$stamp"
fi

make -s -C "$repo/kernels/qtest"
echo "qprobes install: ready ($("$venv/bin/qprobes" --version))"
