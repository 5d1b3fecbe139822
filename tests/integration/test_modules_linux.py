"""Probes in a loaded module: MOD:SYM, the module's own BTF and ORC, and
the probes dropped (never written again) when the module unloads."""

from __future__ import annotations

import re

import pytest

from qprobes.errors import ProbeError
from qprobes.frontends.session import Session
from qprobes.tracing import TraceEvent, Tracer

pytestmark = pytest.mark.vm

TR = "/sys/kernel/tracing"
LOAD = ("insmod /lib/modules/$(uname -r)/kernel/fs/binfmt_misc.ko && mkdir -p /tmp/bm && "
        "mount -t binfmt_misc none /tmp/bm && echo loaded")  # fmt: skip
UNLOAD = "umount /tmp/bm; rmmod binfmt_misc; echo rc=$?"


def test_a_module_that_is_not_loaded_is_refused(linux: Session) -> None:
    tracer = Tracer(linux, lambda e: None)
    with pytest.raises(ProbeError, match="module binfmt_misc is not loaded"):
        tracer.add("p:bm binfmt_misc:bm_status_read")
    with pytest.raises(ProbeError, match="unknown symbol 'bm_status_read' in vmlinux or any"):
        tracer.add("p:bm bm_status_read")
    assert not tracer.probes


def test_module_probes_against_the_guests_kprobe_events(linux: Session) -> None:
    assert "loaded" in linux.command(LOAD)
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    writes: list[int] = []
    engine = linux.engine
    original = engine.kwrite_code
    try:
        tracer.add("p:qp/bm binfmt_misc:bm_status_read nbytes", triggers=["stacktrace"])
        tracer.add("r:qp/bmr binfmt_misc:bm_status_read ret=$retval")
        define = "p:kbm/bm binfmt_misc:bm_status_read nbytes=%dx:u64"
        enable = f"echo 1 > {TR}/events/kbm/enable && echo > {TR}/trace"
        setup = f"echo '{define}' >> {TR}/kprobe_events && {enable} && echo ok"
        assert "ok" in linux.command(setup)
        linux.command("cat /tmp/bm/status; cat /tmp/bm/status")
        linux.command(f"echo 0 > {TR}/events/kbm/enable")
        trace = linux.command(f"cat {TR}/trace")
        linux.command(f"echo '-:kbm/bm' >> {TR}/kprobe_events")
        theirs = re.findall(r"cat-(\d+) .*bm: \((.*?)\) nbytes=(\d+)", trace)
        ours = [e for e in events if e.event == "bm"]
        assert len(theirs) == len(ours) == 4, (trace, ours)
        for (pid, where, nbytes), e in zip(theirs, ours, strict=True):
            assert (int(pid), where, int(nbytes)) == (e.pid, e.location, e.fields["nbytes"])
        assert ours[0].location.endswith(" [binfmt_misc]")
        names = [s.split("+")[0] for s in ours[0].stack_syms]
        assert names[:3] == ["bm_status_read", "vfs_read", "ksys_read"], names
        assert names[-1] == "entry_SYSCALL_64_after_hwframe"
        rets = [e.fields["ret"] for e in events if e.event == "bmr"]
        assert sorted(rets) == [0, 0, 8, 8]  # "enabled\n", then EOF

        # Unload: the probes are dropped before the module's memory goes,
        # and nothing is written there afterwards.
        def spy(addr: int, data: bytes, **how: bool) -> None:
            writes.append(addr)
            original(addr, data, **how)

        engine.kwrite_code = spy  # type: ignore[method-assign]
        assert "rc=0" in linux.command(UNLOAD)
        for tp in tracer.probes.values():
            assert tp.lost and tp.lost_why == "its module binfmt_misc was unloaded"
        module_base = ours[0].addr & ~0xFFF
        for name in list(tracer.probes):
            tracer.remove(name)
        assert not [a for a in writes if module_base - 0x10000 <= a < module_base + 0x10000]
        # Loaded again (likely at the same address), it runs and can be probed anew.
        assert "loaded" in linux.command(LOAD)
        again = tracer.add("p:qp/bm2 binfmt_misc:bm_status_read")
        assert "enabled" in linux.command("cat /tmp/bm/status")
        assert again.nhit == 2
    finally:
        engine.kwrite_code = original  # type: ignore[method-assign]
        for name in list(tracer.probes):
            tracer.remove(name)
        linux.command(UNLOAD)
    dmesg = linux.command("dmesg")
    assert not re.search(r"BUG|Oops|WARNING|general protection", dmesg), dmesg[-2000:]


def test_symbols_lists_a_loaded_modules_symbols() -> None:
    """``qprobes symbols`` attached to a guest with a module loaded lists the
    module's symbols as /proc/kallsyms does, with the same addresses."""
    import subprocess
    import sys

    from qprobes.machine.linux import LINUX_PROMPT, linux_config
    from qprobes.machine.qemu import QemuMachine

    machine = QemuMachine(linux_config(append="qprobes.echo=0"))
    machine.launch()
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        machine.console.sendline(LOAD + "; grep bm_status /proc/kallsyms")
        theirs = machine.console.recvuntil(LINUX_PROMPT, timeout=60).decode()
        machine.release_gdbstub()
        start, size = machine.config.reserved
        proc = subprocess.run(
            [sys.executable, "-m", "qprobes.frontends.cli", "symbols", "--attach",
             str(machine.gdb_socket), "--reserve", f"{start:#x}:{size:#x}", "bm_status*"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        ours = {line.split()[3]: line.split()[0] for line in proc.stdout.splitlines()
                if line.endswith("[binfmt_misc]")}  # fmt: skip
        kallsyms = dict(
            (m.group(2), m.group(1))
            for m in re.finditer(
                r"^([0-9a-f]{16}) \w (bm_status\S*)\s+\[binfmt_misc\]", theirs, re.M
            )
        )
        assert kallsyms and ours == kallsyms, (ours, theirs)
    finally:
        machine.shutdown()
