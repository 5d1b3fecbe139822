#!/usr/bin/env bash
# Install everything qprobes needs on Debian 12 (run as root, or in the Docker
# image): QEMU, gdb, the tools that build the qtest kernel and the default
# Linux guest's initramfs, and a Python virtual environment with qprobes.
# Idempotent: what is already there is not installed again.
#
#   --guest        also build the default Linux guest into the cache now
#                  (else it is built on first use)
#   --user NAME    (as root) create the user NAME and give it the checkout,
#                  the virtual environment and the cache, to run qprobes as
#                  NAME (the Docker image does this)
#   QPROBES_VENV   where the virtual environment goes (default: REPO/.venv)
#   QPROBES_CACHE  where the guests are cached (default: ~/.cache/qprobes)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${QPROBES_VENV:-$repo/.venv}
guest=0
user=
while [ $# -gt 0 ]; do
    case $1 in
        --guest) guest=1; shift ;;
        --user) user=${2:?--user wants a name}; shift 2 ;;
        *) echo "install.sh: unknown option $1 (--guest, --user NAME)" >&2; exit 2 ;;
    esac
done

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
if [ "$guest" = 1 ]; then
    echo "qprobes install: building the default Linux guest"
    "$venv/bin/python" -c 'from qprobes.machine.linux import linux_guest; print(linux_guest().directory)'
fi
if [ -n "$user" ]; then
    id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
    owned=("$repo" "$venv")
    [ -n "${QPROBES_CACHE:-}" ] && owned+=("$QPROBES_CACHE")
    chown -R "$user:" "${owned[@]}"
    echo "qprobes install: $user owns ${owned[*]}"
fi
echo "qprobes install: ready ($("$venv/bin/qprobes" --version))"
