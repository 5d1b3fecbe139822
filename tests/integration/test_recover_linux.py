"""A qprobes session killed while attached, and ``qprobes attach --recover``.

The guest is a QEMU started elsewhere, on 2 vCPUs with a busy loop; qprobes
attaches with hot probes and a return probe that a sleeping task holds, and
is SIGKILLed mid-run. The guest is then stuck (QEMU keeps the doorbell
watchpoint with nobody to answer it); a normal attach must refuse to take
qprobes' own stubs for the guest's handlers; ``--recover`` puts back every
int3, return address, gate and page-table entry from the journal; the guest
runs on clean, with its text and IDT as before, and a later attach works.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from qprobes.machine.linux import LINUX_PROMPT
from tests.integration.attached import BAD, CLI, HOT, answers_cleanly, busy_guest, snapshot

pytestmark = [pytest.mark.vm, pytest.mark.serial]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


def test_recover_after_the_controller_was_killed() -> None:
    machine, addrs = busy_guest()
    try:
        address = str(machine.gdb_socket)
        start, size = machine.config.reserved
        reserve = f"{start:#x}:{size:#x}"
        before = snapshot(address, addrs)

        # No watchdog: it would put the guest back before this test looks.
        proc = subprocess.Popen([*CLI, "trace", "--attach", address, "--reserve", reserve, "-q",
                                 "--no-watchdog", *HOT], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)  # fmt: skip
        assert proc.stderr is not None
        seen, deadline = "", time.monotonic() + 120
        while "Ctrl-C to stop" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "Ctrl-C to stop" in seen, seen
        # A task asleep in a return-probed function holds a hijacked return address.
        machine.console.command("sleep 30 & echo started-sleep", LINUX_PROMPT, timeout=120)
        time.sleep(4)
        proc.kill()  # SIGKILL: no detach, no clean-up
        proc.wait(timeout=30)

        refused = run("trace", "--attach", address, "--reserve", reserve, "--duration", "2",
                      "p:x vfs_read")  # fmt: skip
        assert refused.returncode == 1, refused.stderr
        assert "did not detach" in refused.stderr and "--recover" in refused.stderr
        assert "Traceback" not in refused.stderr

        recovered = run("attach", address, "--recover", "--reserve", reserve)
        assert recovered.returncode == 0, recovered.stderr
        match = re.search(r"recovered the changes of pid (\d+) .*: (\d+) probe sites, "
                          r"(\d+) return addresses, (\d+) IDT gates", recovered.stdout)  # fmt: skip
        assert match, recovered.stdout + recovered.stderr
        assert int(match.group(1)) == proc.pid
        assert int(match.group(2)) == len(HOT)  # every int3 was still armed
        assert int(match.group(3)) >= 1  # the sleeping task's return address
        assert int(match.group(4)) >= 2  # #DB and #BP at least

        # The guest runs its workload again; the sleeper returns through its
        # real return address; nothing went wrong in the guest.
        mark = len(machine.console_text())
        cmd = "kill %3 2>/dev/null; sleep 2; wait %3; echo qp-alive; dmesg"
        out = machine.console.command(cmd, LINUX_PROMPT, timeout=120)
        text = str(out) + machine.console_text()[mark:]
        assert "qp-alive" in text
        assert not [line for line in text.splitlines() if BAD.search(line)], text[-3000:]
        assert snapshot(address, addrs) == before, "what qprobes wrote is not all undone"

        again = run("attach", address, "--recover", "--reserve", reserve)
        assert again.returncode == 0 and "nothing to recover" in again.stdout, again.stdout
        later = run("trace", "--attach", address, "--reserve", reserve, "--duration", "3",
                    "p:op do_sys_openat2 path=+0(%si):string")  # fmt: skip
        assert later.returncode == 0, later.stderr
        assert 'path="/etc/hostname"' in later.stdout
    finally:
        machine.shutdown()


#: A controller that attaches, arms hot probes, then drops its gdbstub
#: connection without detaching and stays alive (a hung qprobes, say).
DROPPER = """
import sys, time
from qprobes.frontends.session import Session
address, start, size = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
s = Session.attach(address, reserve=(start, size), watchdog=False)
for name in ("_raw_spin_lock_irqsave", "vfs_read"):
    s.kprobe(name, lambda kp, ctx: False)
s.run(timeout=2)
s.target.client.close()  # gone from the gdbstub, nothing put back
print("dropped", flush=True)
time.sleep(600)
"""


def test_recover_refuses_while_the_journals_owner_runs() -> None:
    machine, addrs = busy_guest()
    owner = None
    try:
        address = str(machine.gdb_socket)
        start, size = machine.config.reserved
        reserve = f"{start:#x}:{size:#x}"
        before = snapshot(address, addrs)
        owner = subprocess.Popen([sys.executable, "-c", DROPPER, address, hex(start), hex(size)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)  # fmt: skip
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.strip() == "dropped", line + (owner.stderr.read() if owner.stderr else "")
        held = snapshot(address, addrs)
        assert held != before  # its int3s and gates are in the guest

        refused = run("attach", address, "--recover", "--reserve", reserve)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qprobes: error: "), refused.stderr
        assert f"not recovering the changes of pid {owner.pid} " in lines[0]
        assert f"process {owner.pid} is still running" in lines[0] and "--force" in lines[0]
        assert snapshot(address, addrs) == held  # nothing written

        forced = run("attach", address, "--recover", "--reserve", reserve, "--force")
        assert forced.returncode == 0, forced.stderr
        assert f"recovered the changes of pid {owner.pid} " in forced.stdout, forced.stdout
        assert snapshot(address, addrs) == before
        answers_cleanly(machine)
    finally:
        if owner is not None:
            owner.kill()
            owner.wait()
        machine.shutdown()


#: A controller that dies in ``_disarm`` between writing a probe's original
#: byte back and marking its site record step-only, while a vCPU steps the
#: probe's slot: it stops the guest right after a hit's answer (the step
#: set up), writes the byte, and drops the gdbstub connection.
DIES_MID_DISARM = """
import os, sys
from qprobes.frontends.session import Session
from qprobes.probes.kprobe import KprobeStatus
address, start, size = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
s = Session.attach(address, reserve=(start, size), watchdog=False)
engine = s.engine
base = s.symbols.address("do_sys_openat2")  # (the busy loop opens files)
skip = 5 if engine.kread(base, 5) == bytes.fromhex("0f1f440000") else 0  # (ftrace's nop)
kp = s.kprobe(base + skip, lambda kp, ctx: False, boost=False)
point = engine.points[kp.arm_addr]
def stepping():
    return any(k.status is KprobeStatus.HIT_SS and k.current is point
               for k in engine.kcb.values())
s.run(until=stepping, timeout=60)
assert stepping(), "no hit"
engine.kwrite_code(point.addr, bytes([point.opcode]))  # _disarm's byte write
s.target.client.close()  # and the controller is gone
print("died", flush=True)
os._exit(0)
"""


def test_recover_finishes_a_step_whose_site_was_disarmed_before_it_died() -> None:
    """The journal holds a normal site record without its int3 and a step
    that names it: the recovery dropped the site, could not finish the
    step, and left the vCPU with TF set in a slot of an area it unmapped."""
    machine, addrs = busy_guest()
    try:
        address = str(machine.gdb_socket)
        start, size = machine.config.reserved
        reserve = f"{start:#x}:{size:#x}"
        before = snapshot(address, addrs)
        dying = subprocess.run([sys.executable, "-c", DIES_MID_DISARM, address, hex(start),
                                hex(size)], capture_output=True, text=True, timeout=300,
                               check=False)  # fmt: skip
        assert dying.stdout.strip() == "died", dying.stdout + dying.stderr

        recovered = run("attach", address, "--recover", "--reserve", reserve)
        assert recovered.returncode == 0, recovered.stderr
        assert "recovered the changes of pid" in recovered.stdout, recovered.stdout
        answers_cleanly(machine)
        assert snapshot(address, addrs) == before, "what qprobes wrote is not all undone"
    finally:
        machine.shutdown()
