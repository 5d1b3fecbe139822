"""A real gdb beside the probes: ``Session.serve_gdb`` on the default Linux guest.

gdb (/usr/bin/gdb through pygdbmi) connects to qprobes' endpoint while a
probe on ``do_sys_openat2`` and a return probe on ``hrtimer_nanosleep`` fire
under a workload on the console (2 vCPUs). The session's run loop runs on a
thread of its own, as in ``qprobes trace --gdb-listen``; gdb is driven from
the test. What gdb sees must be the guest without qprobes: the original code
at the probe site, no area, real return addresses in stack slots; its own
breakpoints, steps (over the probed instruction too), registers and
monitor commands work; the probes' counts rise while gdb lets the guest
run. After gdb and qprobes are gone, text and IDT hash as before and dmesg
is clean.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import QprobesError
from qprobes.frontends.gdbmi import Gdb, GdbError
from qprobes.frontends.session import Session
from qprobes.machine.linux import LINUX_PROMPT, linux_config
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.kretprobe import Kretprobe
from tests.conftest import require_vm

pytestmark = pytest.mark.vm

GDB = "/usr/bin/gdb"
PROBED = "do_sys_openat2"
OTHER = "do_filp_open"  # called by do_sys_openat2 for every open
RETURN_PROBED = "hrtimer_nanosleep"
WORKLOAD = "(while :; do cat /etc/hostname >/dev/null; sleep 0.05; done) &"
SLEEPER = "(sleep 600) &"
# do_sys_openat2+7 on the default guest: mov r12, rsi (49 89 f4), which
# also encodes as 4c 8b e6.
MOV_OFFSET = 7
MOV, MOV_AGAIN = bytes.fromhex("4989f4"), bytes.fromhex("4c8be6")
BAD = re.compile(r"BUG:|Oops|WARNING:|general protection|unable to handle|Kernel panic|"
                 r"double fault|invalid opcode")  # fmt: skip


@dataclass
class Rig:
    session: Session
    kp: Kprobe
    kp2: Kprobe
    rp: Kretprobe
    address: str
    before: dict[str, str]
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)

    def start(self) -> None:
        """The session's run loop on a thread (it serves gdb too)."""
        self.stop.clear()

        def loop() -> None:
            try:
                self.session.run(until=self.stop.is_set)
            except BaseException as exc:  # reported by the test that ends it
                self.errors.append(exc)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)
            assert not self.thread.is_alive(), "the run loop did not end"
            self.thread = None
        assert not self.errors, self.errors

    def hits(self) -> int:
        return self.kp.nhit


def snapshot(session: Session) -> dict[str, str]:
    """Hashes of the probed functions' text pages and every IDT (guest stopped)."""
    assert session.symbols is not None
    engine, target = session.engine, session.target
    out = {}
    for name in (PROBED, OTHER, RETURN_PROBED):
        addr = session.symbols.address(name)
        out[name] = hashlib.sha256(engine.kread(addr & ~0xFFF, 8192)).hexdigest()
    for vcpu in target.vcpus:
        idt = target.idt(vcpu)
        paddr = target.translate(idt.base, vcpu).paddr
        out[f"idt{vcpu}"] = hashlib.sha256(target.read_phys(paddr, idt.limit + 1)).hexdigest()
    return out


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if not shutil.which(GDB):
        require_vm(f"{GDB} is not installed (scripts/install.sh installs gdb)")
    try:
        session = Session.linux(linux_config(append="qprobes.echo=0", smp=2))
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise
    try:
        session.engine.detach()
        before = snapshot(session)
        session.engine.attach()
        kp = session.kprobe(PROBED, lambda kp, ctx: False)
        kp2 = session.kprobe(f"{PROBED}+{MOV_OFFSET:#x}", lambda kp, ctx: False)
        rp = session.kretprobe(RETURN_PROBED, lambda rp, ctx: None)
        session.command(WORKLOAD)
        session.command(SLEEPER)
        rig = Rig(session, kp, kp2, rp, "", before)
        rig.address = session.serve_gdb("127.0.0.1:0", stopping=rig.stop.is_set).address
        rig.start()
        yield rig
    finally:
        if rig.thread is not None:
            rig.stop.set()
            rig.thread.join(60)
        session.close()


class Cli:
    """gdb/MI with CLI commands whose console and target output is returned."""

    def __init__(self) -> None:
        self.gdb = Gdb(GDB)
        self.gdb.command("-gdb-set confirm off")
        self.gdb.command("-gdb-set mi-async on")
        self("set architecture i386:x86-64")
        self("set disassembly-flavor intel")

    def records(self, line: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        escaped = line.replace("\\", "\\\\").replace('"', '\\"')
        return self.gdb.command_records(f'-interpreter-exec console "{escaped}"', timeout)

    def __call__(self, line: str, timeout: float = 30.0) -> str:
        records = self.records(line, timeout)
        return "".join(str(r.get("payload")) for r in records
                       if r.get("type") in ("console", "target"))  # fmt: skip

    def error(self, line: str) -> str:
        with pytest.raises(GdbError) as info:
            self(line)
        return str(info.value)

    def connect(self, address: str) -> None:
        self.gdb.command(f"-target-select remote {address}", timeout=60)

    def cont(self) -> None:
        self.gdb.command("-exec-continue")

    def interrupt(self) -> None:
        self.gdb.command("-exec-interrupt")
        self.gdb.wait_stopped(30)

    def wait_stopped(self, timeout: float = 60) -> None:
        self.gdb.wait_stopped(timeout)

    def register(self, name: str) -> int:
        found = re.search(rf"^{name}\s+(0x[0-9a-f]+)", self(f"info registers {name}"), re.M)
        assert found, f"no {name} in info registers"
        return int(found.group(1), 16)

    def close(self) -> None:
        self.gdb.close()


@pytest.fixture(scope="module")
def gdb(rig: Rig) -> Iterator[Cli]:
    cli = Cli()
    try:
        cli.connect(rig.address)
        yield cli
    finally:
        cli.close()


def rise(rig: Rig, seconds: float = 10.0) -> int:
    """Wait until the probe's count rises; returns how much it rose."""
    start = rig.hits()
    deadline = time.monotonic() + seconds
    while rig.hits() == start and time.monotonic() < deadline:
        time.sleep(0.05)
    return rig.hits() - start


def test_probe_site_shows_the_original_code(rig: Rig, gdb: Cli) -> None:
    engine = rig.session.engine
    assert rig.kp.arm_addr is not None and rig.session.symbols is not None
    arm = rig.kp.arm_addr
    func = rig.session.symbols.address(PROBED)
    point = engine.points[arm]
    # The int3 is in the guest; gdb sees the saved byte.
    assert engine.read_data(arm, 1) == b"\xcc"
    shown = gdb(f"x/1xb {arm:#x}")
    assert f"{point.opcode:#04x}" in shown, shown
    # x/8i at the function: the original instructions, as decoded from the
    # bytes qprobes saved.
    original = engine._original_bytes(func, 64)
    want = []
    addr = func
    for _ in range(8):
        insn = x86insn.decode(original[addr - func :], addr)
        want.append((addr, insn.mnemonic))
        addr += insn.length
    text = gdb(f"x/8i {func:#x}")
    got = re.findall(r"(0x[0-9a-f]+)(?: <[^>]*>)?:\s+(\w+)", text)
    assert [(int(a, 16), m) for a, m in got] == want, text
    assert "int3" not in text


def test_counts_rise_while_gdb_is_attached(rig: Rig, gdb: Cli) -> None:
    gdb.cont()
    assert rise(rig) > 0
    assert rise(rig) > 0
    # The probes' stops (doorbells) never reach gdb.
    records = gdb.gdb._read(0.5)
    assert not [r for r in records if r.get("message") == "stopped"], records
    first = rig.hits()
    gdb.interrupt()
    time.sleep(0.5)
    held = rig.hits()
    time.sleep(1.0)
    assert rig.hits() == held, "a probe fired while gdb held the guest"
    gdb.cont()
    assert rise(rig) > 0 and rig.hits() > first
    gdb.interrupt()


def test_idt_gates_read_as_the_guests_own(rig: Rig, gdb: Cli) -> None:
    session = rig.session
    target = session.target
    base = int(re.search(r"IDT=\s*([0-9a-f]+)", gdb("monitor info registers")).group(1), 16)  # type: ignore[union-attr]
    paddr = target.translate(base, 1).paddr
    gates = session.engine.saved_gates()
    for vector in (1, 3, 14):
        original = gates[(paddr, vector)]
        assert session.engine.read_data(base + 16 * vector, 16) != original  # qprobes' stub
        shown = re.findall(r"0x([0-9a-f]{2})\b", gdb(f"x/16xb {base + 16 * vector:#x}"))
        assert bytes(int(b, 16) for b in shown) == original, vector


def test_a_watchpoint(rig: Rig, gdb: Cli) -> None:
    assert rig.session.symbols is not None
    jiffies = rig.session.symbols.address("jiffies_64")
    text = gdb(f"watch *(unsigned long *){jiffies:#x}")
    assert "atchpoint" in text, text
    gdb.cont()
    seen = gdb.gdb.wait_for(lambda r: r.get("type") == "notify" and r.get("message") == "stopped",
                            60, "*stopped")  # fmt: skip
    assert seen[-1]["payload"].get("reason") == "watchpoint-trigger", seen[-1]
    gdb("delete")
    gdb.cont()
    assert rise(rig) > 0
    gdb.interrupt()


def test_the_area_reads_as_unmapped(rig: Rig, gdb: Cli) -> None:
    (lo, _hi), = rig.session.engine.area_ranges()
    assert "Cannot access memory" in gdb.error(f"x/4xb {lo:#x}")
    tramp = rig.session.kretprobes.trampoline
    assert "Cannot access memory" in gdb.error(f"x/1i {tramp:#x}")


def test_no_vcpu_is_left_in_qprobes_code(rig: Rig, gdb: Cli) -> None:
    (lo, hi), = rig.session.engine.area_ranges()
    for thread in (1, 2):
        gdb(f"thread {thread}")
        assert not lo <= gdb.register("rip") < hi
    gdb("thread 1")


def test_break_continue_bt(rig: Rig, gdb: Cli) -> None:
    symbols = rig.session.symbols
    assert symbols is not None
    other = symbols.address(OTHER)
    gdb(f"break *{other:#x}")
    gdb.cont()
    gdb.wait_stopped()
    assert gdb.register("rip") == other
    bt = gdb("bt 3")
    frames = re.findall(r"^#(\d+)\s+(0x[0-9a-f]+)", bt, re.M)
    assert len(frames) >= 2, bt
    assert int(frames[0][1], 16) == other
    # Frame 1 is a return address: right after a call of the function.
    ret = int(frames[1][1], 16)
    call = rig.session.engine.read_data(ret - 5, 5)
    assert call[0] == 0xE8, bt
    assert (ret + int.from_bytes(call[1:], "little", signed=True)) & (2**64 - 1) == other, bt
    caller = symbols.resolve(ret)
    assert caller is not None and caller[0].name in (PROBED, "do_open_execat"), bt
    gdb("delete")


def test_stepi_over_the_probed_instruction(rig: Rig, gdb: Cli) -> None:
    engine = rig.session.engine
    arm = rig.kp.arm_addr
    assert arm is not None
    point = engine.points[arm]
    gdb(f"break *{arm:#x}")  # gdb's own breakpoint on a probed address
    before = rig.hits()
    gdb.cont()
    gdb.wait_stopped()
    assert gdb.register("rip") == arm
    rsp = gdb.register("rsp")
    gdb("delete")
    gdb("stepi")
    # The original instruction ran (push r12: rsp down 8), not the int3.
    assert point.insn.mnemonic == "push", point.insn
    assert gdb.register("rip") == arm + point.insn.length
    assert gdb.register("rsp") == rsp - 8
    assert engine.read_data(arm, 1) == b"\xcc", "the int3 was not put back"
    assert rig.hits() >= before
    gdb.cont()
    assert rise(rig) > 0, "the probe stopped firing after the step"
    gdb.interrupt()


def test_registers_read_and_write(rig: Rig, gdb: Cli) -> None:
    text = gdb("info registers")
    for name in ("rax", "rsp", "rip", "eflags", "cs", "cr3"):
        assert re.search(rf"^{name}\s+0x", text, re.M), name
    old = gdb.register("r11")
    gdb("set var $r11 = 0x1234abcd")
    assert gdb.register("r11") == 0x1234ABCD
    gdb(f"set var $r11 = {old:#x}")
    assert gdb.register("r11") == old


def test_rip_cannot_be_set_into_qprobes_area(rig: Rig, gdb: Cli) -> None:
    """A vCPU that gdb sent into a stub or a slot would run qprobes' code
    without its host's answers: the write is refused, rip stays."""
    (lo, _hi), = rig.session.engine.area_ranges()
    old = gdb.register("rip")
    said = gdb.error(f"set var $pc = {lo + 0x100:#x}")
    assert "qprobes refused to set thread" in said and "rip" in said, said
    assert gdb.register("rip") == old
    assert "VM status" in gdb("monitor info status")  # the replies are not out of step


def test_monitor_commands(rig: Rig, gdb: Cli) -> None:
    assert "VM status" in gdb("monitor info status")
    for command in ("system_reset", "quit", "loadvm snap", "stop", "cont"):
        out = gdb(f"monitor {command}")
        assert "refused" in out, (command, out)
    gdb.cont()
    assert rise(rig) > 0, "the guest does not run after the refused commands"
    gdb.interrupt()


def test_kretprobe_return_address_reads_as_the_real_one(rig: Rig, gdb: Cli) -> None:
    kret = rig.session.kretprobes
    tramp = kret.trampoline
    # The sleeper sleeps in hrtimer_nanosleep: its instance is live.
    live = [slot for slot, insts in kret.live.items()
            if any(i.rp is rig.rp for i in insts)]  # fmt: skip
    assert live, "no live hrtimer_nanosleep instance"
    checked = 0
    for slot in live:
        raw = struct.unpack("<Q", rig.session.engine.read_data(slot, 8))[0]
        real = kret.find_ret_addr(slot)
        if raw != tramp or real is None:
            continue
        shown = re.search(r":\s+(0x[0-9a-f]+)", gdb(f"x/1gx {slot:#x}"))
        assert shown and int(shown.group(1), 16) == real
        checked += 1
    assert checked


def test_write_into_the_probed_site_keeps_the_int3(rig: Rig, gdb: Cli) -> None:
    engine = rig.session.engine
    arm = rig.kp.arm_addr
    assert arm is not None
    point = engine.points[arm]
    gdb(f"set var *(unsigned char *){arm:#x} = {point.opcode:#x}")
    assert engine.read_data(arm, 1) == b"\xcc"
    assert engine.points[arm].opcode == point.opcode
    gdb.cont()
    assert rise(rig) > 0
    gdb.interrupt()


def test_write_a_new_instruction_into_a_probed_site(rig: Rig, gdb: Cli) -> None:
    engine = rig.session.engine
    addr = rig.kp2.arm_addr
    assert addr is not None
    point = engine.points[addr]
    assert point.insn.raw == MOV, point.insn
    old_slot = point.slot
    gdb.gdb.command(f"-data-write-memory-bytes {addr:#x} {MOV_AGAIN.hex()}")
    assert engine.read_data(addr, 1) == b"\xcc"  # still probed
    assert engine.points[addr].insn.raw == MOV_AGAIN and point.slot != old_slot
    assert engine.read_data(addr + 1, 2) == MOV_AGAIN[1:]
    assert f"{MOV_AGAIN[0]:#04x}" in gdb(f"x/1xb {addr:#x}")
    start = rig.kp2.nhit
    gdb.cont()
    deadline = time.monotonic() + 10
    while rig.kp2.nhit == start and time.monotonic() < deadline:
        time.sleep(0.05)
    gdb.interrupt()
    assert rig.kp2.nhit > start, "the probe stopped firing after its instruction changed"
    gdb.gdb.command(f"-data-write-memory-bytes {addr:#x} {MOV.hex()}")
    assert engine.points[addr].insn.raw == MOV
    assert engine.read_data(addr, 1) == b"\xcc"


def test_detach_and_reconnect(rig: Rig, gdb: Cli) -> None:
    gdb("detach")
    assert rise(rig) > 0, "the probes stopped with gdb detached"
    assert rise(rig) > 0
    gdb.connect(rig.address)
    assert rig.session.gdb_server is not None
    assert rig.session.gdb_server.connections == 2
    assert "int3" not in gdb(f"x/4i {rig.kp.arm_addr:#x}")
    gdb.cont()
    assert rise(rig) > 0


def test_qprobes_detaching_ends_the_endpoint(rig: Rig, gdb: Cli) -> None:
    # gdb waits for a stop while the guest runs; qprobes leaves.
    rig.halt()
    rig.session.end_gdb()
    seen = gdb.gdb.wait_for(lambda r: "closed" in str(r.get("payload")), 30,
                            "the connection to close")  # fmt: skip
    text = "".join(str(r.get("payload")) for r in seen)
    assert "qprobes: detaching" in text, text


def test_the_guest_is_as_before(rig: Rig) -> None:
    session = rig.session
    session.engine.detach()
    assert snapshot(session) == rig.before
    console = session.console
    session.target.resume()
    time.sleep(1.0)
    console.sendline("echo qp-dmesg-start; dmesg; echo qp-dmesg-end")
    out = console.recvuntil(b"qp-dmesg-end\r\n", timeout=60).decode(errors="replace")
    console.recvuntil(LINUX_PROMPT, timeout=60)
    session.engine._stop_quietly()
    assert "qp-dmesg-start" in out
    assert [line for line in out.splitlines() if BAD.search(line)] == []
