#!/usr/bin/env bash
# Build qprobes' default Linux guest: a pinned Debian cloud kernel and a tiny
# busybox initramfs that boots to a root shell on the serial console.
#
#   scripts/build-linux-guest.sh [CACHE_DIR]
#
# CACHE_DIR defaults to ${QPROBES_CACHE:-$HOME/.cache/qprobes}/linux and ends up
# holding:
#   vmlinuz             the kernel (bzImage) from the Debian package
#   config              its build configuration (the package's System.map is a
#                       dummy: symbols come from the guest's kallsyms or BTF)
#   initramfs.cpio.gz   busybox, /init, the qp-* workload helpers and two small
#                       modules of the kernel package with no dependencies
#                       (crc7.ko; binfmt_misc.ko, whose code user space can run)
#   crc7.ko, binfmt_misc.ko  those modules, kept with the kernel they belong to
#   guest.json          manifest: package, version, checksums, build date
#
# On Debian it gets the packages with apt (run as root: apt-get update runs
# only when the package lists are empty or lack the pin). Elsewhere (Fedora,
# Arch) qprobes downloads the pinned packages from Debian's archive over HTTPS,
# checks the checksums below, unpacks them in Python
# (qprobes/machine/debfetch.py) and hands them over:
#   QPROBES_KERNEL_PACKAGE=DIR  DIR holds the pinned kernel package's files
#   QPROBES_BUSYBOX=FILE        a static busybox (the pinned busybox-static's)
# Verified packages are kept in CACHE_DIR/packages (a rebuild downloads nothing).
# Idempotent: a cache that matches this script and its checksums is reused.
set -euo pipefail

# The pinned kernel: the newest cloud ABI in bookworm(-security) on 2026-11-25.
# Debian drops old ABI versions from the archive; when the pin is gone the
# script falls back to what linux-image-cloud-amd64 depends on at the time,
# says so, and records that package's checksum in guest.json.
PIN_PACKAGE=linux-image-6.1.0-56-cloud-amd64
PIN_VERSION=6.1.192-2
PIN_SHA256=e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee
# Where the pin is, under a Debian mirror's root (https://deb.debian.org/ or a
# snapshot.debian.org archive at PIN_SNAPSHOT), for hosts without apt.
PIN_POOL=debian-security/pool/updates/main/l/linux-signed-amd64/linux-image-6.1.0-56-cloud-amd64_6.1.192-2_amd64.deb
PIN_SNAPSHOT=20261201T000000Z
# busybox-static for hosts with neither apt nor a static busybox.
BUSYBOX_PIN_PACKAGE=busybox-static
BUSYBOX_PIN_VERSION=1:1.35.0-4+deb12u1+b1
BUSYBOX_PIN_SHA256=3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744
BUSYBOX_PIN_POOL=debian/pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_amd64.deb
META_PACKAGE=linux-image-cloud-amd64
# Modules of the kernel package with no dependencies, put in the initramfs
# so that tests can load a module while probes are armed (crc7) and probe a
# module's own code (binfmt_misc: mount it, read its status file).
TEST_MODULE=crc7
TEST_MODULE_PATH=kernel/lib/crc7.ko
TEST_MODULE_PATHS="kernel/lib/crc7.ko kernel/fs/binfmt_misc.ko"

GUEST_HOSTNAME=qprobes-guest
GUEST_PROMPT='qprobes-guest# '
GUEST_READY='qprobes-guest: ready'

cache=${1:-${QPROBES_CACHE:-$HOME/.cache/qprobes}/linux}
self=$(readlink -f "${BASH_SOURCE[0]}")

say() { echo "build-linux-guest: $*"; }
die() {
    echo "build-linux-guest: error: $*" >&2
    exit 1
}
sha256() { sha256sum "$1" | cut -d' ' -f1; }
# The value of "key" in guest.json (written below: one "key": "value" a line).
manifest_get() { sed -n "s/^  \"$2\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" "$1" | head -n1; }

builder_sha=$(sha256 "$self")

mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
exec 9>"$cache/.lock"
flock 9

# --- a valid cache is reused as it is -------------------------------------------

cache_valid() {
    local m=$cache/guest.json
    [ -f "$m" ] && [ -f "$cache/vmlinuz" ] && [ -f "$cache/initramfs.cpio.gz" ] || return 1
    [ "$(manifest_get "$m" builder_sha256)" = "$builder_sha" ] || return 1
    [ "$(manifest_get "$m" vmlinuz_sha256)" = "$(sha256 "$cache/vmlinuz")" ] || return 1
    [ "$(manifest_get "$m" initramfs_sha256)" = "$(sha256 "$cache/initramfs.cpio.gz")" ] || return 1
}
if cache_valid; then
    say "cache $cache is up to date ($(manifest_get "$cache/guest.json" package)" \
        "$(manifest_get "$cache/guest.json" version))"
    exit 0
fi

work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt-get download runs as the _apt user when it can: let it write here.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chown _apt "$work"
fi

# --- apt helpers ------------------------------------------------------------------

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "apt-get update needs root (run this script as root)"
        return 1
    fi
    say "apt-get update"
    apt-get update -qq || return 1
    apt_updated=1
}
lists_empty() { ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; }
# Is package=version known to apt?
apt_has() { apt-cache show "$1=$2" >/dev/null 2>&1; }
# Download package=version into $work; print the .deb's path.
apt_download() {
    local pkg=$1 ver=$2
    (cd "$work" && apt-get download -q "$pkg=$ver" >&2) || return 1
    local deb
    deb=$(find "$work" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
    [ -n "$deb" ] || return 1
    echo "$deb"
}

kernel_package=${QPROBES_KERNEL_PACKAGE:-}
given_busybox=${QPROBES_BUSYBOX:-}
need_apt() {
    command -v apt-get >/dev/null ||
        die "apt-get not found: $1 (qprobes downloads the pinned packages itself where apt is missing)"
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found: $1"
    if lists_empty; then
        apt_update || die "apt's package lists are empty and apt-get update failed"
    fi
}
# Keep a verified package for the next build.
keep_package() { mkdir -p "$cache/packages" && mv -f "$1" "$cache/packages/"; }

# --- the kernel -------------------------------------------------------------------

# The cached kernel is kept if it is the pin, or the fallback chosen when this
# same pin was missing (so a changed pin refreshes it).
kernel_reusable() {
    local info=$cache/kernel.info
    [ -f "$info" ] && [ -f "$cache/vmlinuz" ] && [ -f "$cache/config" ] || return 1
    local pkg ver pinned_for vsha
    pkg=$(sed -n 's/^package=//p' "$info")
    ver=$(sed -n 's/^version=//p' "$info")
    pinned_for=$(sed -n 's/^pin=//p' "$info")
    vsha=$(sed -n 's/^vmlinuz_sha256=//p' "$info")
    [ "$vsha" = "$(sha256 "$cache/vmlinuz")" ] || return 1
    local path
    for path in $TEST_MODULE_PATHS; do
        [ -f "$cache/$(basename "$path")" ] || return 1
    done
    [ "$pkg=$ver" = "$PIN_PACKAGE=$PIN_VERSION" ] || [ "$pinned_for" = "$PIN_PACKAGE=$PIN_VERSION" ]
}

fetch_kernel() {
    local pkg=$PIN_PACKAGE ver=$PIN_VERSION expect=$PIN_SHA256 pinned=true deb="" got
    if [ -n "$kernel_package" ]; then
        # Downloaded and checked against PIN_SHA256 by qprobes, and unpacked.
        [ -d "$kernel_package/boot" ] || die "QPROBES_KERNEL_PACKAGE=$kernel_package has no boot/"
        say "using $pkg $ver unpacked by qprobes (sha256 $expect checked)"
        got=$expect
        install_kernel "$kernel_package"
        return
    fi
    need_apt "cannot download the kernel package"
    if ! apt_has "$pkg" "$ver"; then
        # Maybe the lists are older than the pin.
        apt_update || say "warning: could not refresh apt's package lists"
    fi
    if apt_has "$pkg" "$ver"; then
        say "downloading pinned $pkg $ver"
        deb=$(apt_download "$pkg" "$ver") || deb=""
        [ -n "$deb" ] || say "warning: download of the pinned $pkg $ver failed"
    fi
    if [ -z "$deb" ]; then
        # The pin has left the archive: take the current cloud kernel instead.
        pkg=$(apt-cache depends "$META_PACKAGE" 2>/dev/null |
            sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | sort -V | tail -n1)
        [ -n "$pkg" ] || die "neither $PIN_PACKAGE $PIN_VERSION nor a dependency of $META_PACKAGE is in the archive"
        ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
        if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
            die "$pkg (from $META_PACKAGE) has no candidate version"
        fi
        expect=$(apt-cache show "$pkg=$ver" | sed -n 's/^SHA256: //p' | head -n1)
        pinned=false
        say "WARNING: the pinned kernel $PIN_PACKAGE $PIN_VERSION is not available"
        say "WARNING: (gone from Debian's archive, or its download failed);"
        say "WARNING: falling back to $pkg $ver (the current dependency of $META_PACKAGE)."
        say "WARNING: update PIN_PACKAGE/PIN_VERSION/PIN_SHA256/PIN_POOL in $self."
        deb=$(apt_download "$pkg" "$ver") || die "apt-get download $pkg=$ver failed"
    fi
    got=$(sha256 "$deb")
    if [ -n "$expect" ] && [ "$got" != "$expect" ]; then
        die "checksum mismatch for $(basename "$deb"): expected $expect, got $got"
    fi
    say "$(basename "$deb"): sha256 $got ok"

    dpkg-deb -x "$deb" "$work/kpkg"
    keep_package "$deb"
    install_kernel "$work/kpkg"
    rm -rf "$work/kpkg"
}

# Install the kernel package unpacked in $1 into the cache ($pkg, $ver,
# $pinned and $got describe it).
install_kernel() {
    local kpkg=$1 vmlinuz config release
    vmlinuz=$(find "$kpkg/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit)
    config=$(find "$kpkg/boot" -maxdepth 1 -name 'config-*' -print -quit)
    if [ -z "$vmlinuz" ] || [ -z "$config" ]; then
        die "$pkg $ver has no boot/vmlinuz-* or boot/config-*"
    fi
    release=${vmlinuz##*/vmlinuz-}
    for opt in CONFIG_KPROBES CONFIG_KPROBE_EVENTS CONFIG_SERIAL_8250_CONSOLE CONFIG_DEVTMPFS \
        CONFIG_BLK_DEV_INITRD CONFIG_RD_GZIP; do
        grep -qx "$opt=y" "$config" || die "$release lacks $opt=y"
    done
    # The package has no modules.dep (depmod writes it at install time): the
    # module's own .modinfo must list no dependencies.
    local ko path
    for path in $TEST_MODULE_PATHS; do
        ko=$kpkg/lib/modules/$release/$path
        [ -f "$ko" ] || die "$pkg $ver has no lib/modules/$release/$path"
        # (grep reads it all: with -q it could exit first and tr's SIGPIPE
        # would fail the pipeline under pipefail.)
        tr '\0' '\n' <"$ko" | grep -x 'depends=' >/dev/null ||
            die "$path depends on other modules: $(tr '\0' '\n' <"$ko" | grep -a '^depends=')"
        tr '\0' '\n' <"$ko" | grep -a "^vermagic=$release " >/dev/null ||
            die "$path was not built for $release"
        install -m 0644 "$ko" "$cache/$(basename "$path")"
    done
    install -m 0644 "$vmlinuz" "$cache/vmlinuz.new"
    install -m 0644 "$config" "$cache/config.new"
    mv -f "$cache/config.new" "$cache/config"
    mv -f "$cache/vmlinuz.new" "$cache/vmlinuz"
    cat >"$cache/kernel.info" <<EOF
package=$pkg
version=$ver
release=$release
deb_sha256=$got
pinned=$pinned
pin=$PIN_PACKAGE=$PIN_VERSION
vmlinuz_sha256=$(sha256 "$cache/vmlinuz")
EOF
}

if kernel_reusable; then
    say "reusing the cached kernel ($(sed -n 's/^package=//p' "$cache/kernel.info"))"
else
    rm -f "$cache/guest.json" "$cache/kernel.info"
    fetch_kernel
fi

# --- busybox ------------------------------------------------------------------------

is_static() {
    local out
    out=$(LC_ALL=C ldd "$1" 2>&1 || true) # ldd fails on a static binary
    grep -Eq 'not a dynamic executable|statically linked' <<<"$out"
}
busybox=$(command -v busybox || echo /bin/busybox)
busybox_version=""
if [ -n "$given_busybox" ]; then
    busybox=$given_busybox
    busybox_version=$BUSYBOX_PIN_VERSION
    is_static "$busybox" || die "QPROBES_BUSYBOX=$busybox is not statically linked"
elif [ -x "$busybox" ] && is_static "$busybox"; then
    busybox_version=$(dpkg-query -W -f='${Version}' busybox-static 2>/dev/null || true)
else
    need_apt "no static busybox on this host"
    # No static busybox on the host (or the dynamic "busybox" package): take
    # the busybox-static package's binary without installing it.
    ver=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p')
    if [ -z "$ver" ] || [ "$ver" = "(none)" ]; then
        apt_update || die "busybox-static is unknown to apt and apt-get update failed"
        ver=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p')
    fi
    say "downloading busybox-static $ver"
    deb=$(apt_download busybox-static "$ver") || die "apt-get download busybox-static failed"
    dpkg-deb -x "$deb" "$work/bbpkg"
    keep_package "$deb"
    busybox=$work/bbpkg/bin/busybox
    busybox_version=$ver
    is_static "$busybox" || die "$busybox is not statically linked"
fi
busybox_version=${busybox_version:-unknown}

# --- the initramfs -------------------------------------------------------------------

root=$work/root
mkdir -p "$root"
(cd "$root" && mkdir -p bin sbin usr/bin usr/sbin dev proc sys tmp run mnt root etc \
    var/tmp usr/share/qprobes)
install -m 0755 "$busybox" "$root/bin/busybox"
"$busybox" --list-full | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done

cat >"$root/init" <<EOF
#!/bin/sh
# qprobes guest init: mount the pseudo file systems, then a root shell on the
# serial console. When the shell exits the machine powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=\${TERM:-vt100}
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
echo $GUEST_HOSTNAME >/etc/hostname
hostname -F /etc/hostname
ln -sf /proc/self/fd /dev/fd 2>/dev/null
# Long command lines from the host must not wrap in ash's line editor.
stty cols 1024 rows 48 2>/dev/null
# qprobes.echo=0 on the kernel command line: no echo and no line editing
# (ash then reads plain lines and never sends its ESC[6n cursor query).
case " \$(cat /proc/cmdline) " in
*" qprobes.echo=0 "*) stty -echo ;;
esac
export PS1='$GUEST_PROMPT'
echo
echo '$GUEST_READY'
setsid cttyhack sh
status=\$?
# qprobes boot exits with this status.
echo "$GUEST_HOSTNAME: shell exited with status \$status, powering off"
sync
poweroff -f
EOF
chmod 0755 "$root/init"

cat >"$root/usr/bin/qp-open" <<'EOF'
#!/bin/sh
# qp-open N FILE: open FILE and read its first line N times, from the shell
# itself (no fork: exactly one openat per round), then print a summary line.
n=${1:?usage: qp-open N FILE}
f=${2:?usage: qp-open N FILE}
[ -r "$f" ] || { echo "qp-open: cannot read $f" >&2; exit 1; }
i=0
while [ "$i" -lt "$n" ]; do
    read -r _line <"$f"
    i=$((i + 1))
done
echo "qp-open: $n opens of $f"
EOF

cat >"$root/usr/bin/qp-work" <<'EOF'
#!/bin/sh
# qp-work [N]: N rounds (default 1) of a small mixed workload: cat, ls, a
# write to a file in /tmp, a read back; then print a summary line.
n=${1:-1}
i=0
while [ "$i" -lt "$n" ]; do
    cat /etc/hostname /usr/share/qprobes/hello.txt >/dev/null
    ls / /usr/share/qprobes >/dev/null
    echo "round $i" >/tmp/qp-work.out
    cat /tmp/qp-work.out >/dev/null
    i=$((i + 1))
done
rm -f /tmp/qp-work.out
echo "qp-work: $n rounds"
EOF
chmod 0755 "$root/usr/bin/qp-open" "$root/usr/bin/qp-work"

release=$(sed -n 's/^release=//p' "$cache/kernel.info")
for path in $TEST_MODULE_PATHS; do
    moddir=$root/lib/modules/$release/$(dirname "$path")
    mkdir -p "$moddir"
    install -m 0644 "$cache/$(basename "$path")" "$moddir/"
done

echo "hello from the qprobes guest" >"$root/usr/share/qprobes/hello.txt"
seq 1 1000 >"$root/usr/share/qprobes/numbers.txt"
head -c 65536 /dev/zero >"$root/usr/share/qprobes/zero-64k.bin"
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
echo 'root:x:0:' >"$root/etc/group"
printf '%s\n' "$GUEST_HOSTNAME" >"$root/etc/hostname"
if [ "$(id -u)" = 0 ]; then
    mknod -m 0600 "$root/dev/console" c 5 1
    mknod -m 0666 "$root/dev/null" c 1 3
fi

# Reproducible archive: sorted names, fixed times, root ownership.
find "$root" -exec touch -h -d @0 {} +
if command -v cpio >/dev/null; then
    cpio_cmd=(cpio --quiet -o -H newc -R 0:0 --null)
    # (Not "cpio --help | grep -q": grep may exit before cpio has written
    # it all, and cpio's SIGPIPE fails that pipeline under pipefail, which
    # left --reproducible out now and then and changed the archive.)
    cpio_help=$(cpio --help 2>/dev/null || true)
    case $cpio_help in *--reproducible*) cpio_cmd+=(--reproducible) ;; esac
else
    cpio_cmd=("$busybox" cpio -o -H newc -0)
fi
(cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z | "${cpio_cmd[@]}") |
    gzip -9 -n >"$work/initramfs.cpio.gz"
mv -f "$work/initramfs.cpio.gz" "$cache/initramfs.cpio.gz"

# --- the manifest ------------------------------------------------------------------

kinfo() { sed -n "s/^$1=//p" "$cache/kernel.info"; }
cat >"$cache/guest.json.new" <<EOF
{
  "package": "$(kinfo package)",
  "version": "$(kinfo version)",
  "release": "$(kinfo release)",
  "sha256": "$(kinfo deb_sha256)",
  "pinned": $(kinfo pinned),
  "pin": "$PIN_PACKAGE=$PIN_VERSION",
  "vmlinuz_sha256": "$(sha256 "$cache/vmlinuz")",
  "initramfs_sha256": "$(sha256 "$cache/initramfs.cpio.gz")",
  "busybox_version": "$busybox_version",
  "test_module": "/lib/modules/$(kinfo release)/$TEST_MODULE_PATH",
  "test_modules": [$(for path in $TEST_MODULE_PATHS; do printf '%s"/lib/modules/%s/%s"' "${sep:-}" "$(kinfo release)" "$path"; sep=", "; done)],
  "hostname": "$GUEST_HOSTNAME",
  "prompt": "$GUEST_PROMPT",
  "ready": "$GUEST_READY",
  "builder_sha256": "$builder_sha",
  "build_date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
}
EOF
mv -f "$cache/guest.json.new" "$cache/guest.json"
say "built $cache: $(kinfo package) $(kinfo version) (uname -r $(kinfo release))," \
    "initramfs $(du -k "$cache/initramfs.cpio.gz" | cut -f1) KiB"
