"""Detours (jump-optimized fast-path probes) on the default Linux guest, 2
vCPUs with a busy loop running.

The same definitions on hot functions, traced with detours, then on the
int3 fast path, each time beside the guest's own kprobe_events on the same
functions and fetch arguments: every count equal, the same values, no stop
per hit, and the probed bytes are the jump while detoured (so no hit can
raise an int3). The functions cover the window kinds: a single 7-byte
rip-relative load right after the ftrace nop (a probe at ``SYM``), three
pushes, and a window that ends with a ``call`` (whose copy pushes the
original return address). Refusals keep the int3 fast path with the reason
said; after detach the kernel text and the IDTs hash as before and the
guest's dmesg stays clean.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator

import iced_x86
import pytest

from qprobes.arch.x86_64 import detour as x86detour
from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.machine.linux import linux_config
from qprobes.tracing import TraceEvent, Tracer
from tests.conftest import require_vm
from tests.integration.test_detach_linux import bad_lines, console_after
from tests.integration.test_trace_linux import parse_ftrace

pytestmark = pytest.mark.vm

# (event, function, fetch args): kprobe_events syntax for both sides.
PROBES = [
    ("ae", "alloc_empty_file", "flags=%di:x32"),  # +5: mov rax, [rip + disp32]
    ("vr", "vfs_read", "count=%dx:u64"),  # +5: push r15; push r14; push r13
    ("cl", "__x64_sys_close", "fd=+0x70(%di):s32"),  # +5: mov edi, [rdi + 0x70]; call
]
N = 150
# (The busy loop is a job of the same shell: wait for these two only.)
WORKLOAD = (f"qp-open {N} /etc/hostname & A=$!; qp-open {N} /etc/passwd & B=$!; "
            "dd if=/dev/zero of=/dev/null bs=1 count=1500 2>/dev/null; wait $A $B")  # fmt: skip
COMMS = {"qp-open", "dd"}
LOOP = "(while :; do cat /etc/hostname >/dev/null; ls /proc >/dev/null 2>&1; done) &"
TR = "/sys/kernel/tracing"


@pytest.fixture(scope="module")
def busy() -> Iterator[Session]:
    try:
        session = Session.linux(linux_config(append="qprobes.echo=0", smp=2))
    except QprobesError as exc:
        require_vm(f"the 2-vCPU Linux guest cannot be booted: {exc}")
        raise
    try:
        session.command(LOOP)
        yield session
    finally:
        session.close()


def _idt_digests(s: Session) -> list[str]:
    out = []
    for vcpu in s.target.vcpus:
        idt = s.target.idt(vcpu)
        paddr = s.target.translate(idt.base, vcpu).paddr
        out.append(hashlib.sha256(s.target.read_phys(paddr, idt.limit + 1)).hexdigest())
    return out


def _text_digest(s: Session) -> str:
    assert s.symbols is not None
    start, end = s.symbols.address("_stext"), s.symbols.address("_etext")
    return hashlib.sha256(s.engine.read_data(start, end - start)).hexdigest()


def _probed_text(s: Session) -> dict[str, str]:
    """Hashes of the probed functions' text: what qprobes wrote (the guest's
    own kprobe_events patch other text, e.g. deferred static keys, on their
    own schedule)."""
    assert s.symbols is not None
    out = {}
    for _event, function, _args in PROBES:
        sym = s.symbols.lookup(function)
        out[function] = hashlib.sha256(s.engine.read_data(sym.addr, sym.size)).hexdigest()
    return out


def _values(fields: dict[str, object]) -> tuple[int, ...]:
    return tuple(int(str(v), 0) for v in fields.values())


def _run(s: Session, detour: bool) -> tuple[Counter[tuple[int, str, tuple[int, ...]]],
                                            Counter[tuple[int, str, tuple[int, ...]]], int,
                                            dict[str, tuple[int, bytes]],
                                            dict[str, object]]:  # fmt: skip
    """One run of WORKLOAD with the probes traced by qprobes (fast path,
    with or without detours) and by the guest's kprobe_events: (qprobes'
    events, the guest's, doorbell stops other than full-ring hand-overs,
    the bytes at each probe, the summary rows)."""
    events: list[TraceEvent] = []
    tracer = Tracer(s, events.append, fast=True, detour=detour)
    bytes_at: dict[str, tuple[int, bytes]] = {}
    try:
        for event, function, args in PROBES:
            tp = tracer.add(f"p:qp/{event} {function} {args}")
            assert tp.fast_id, (function, tp.slow_reason)
            kp = tp.kprobe
            assert kp is not None and kp.arm_addr is not None
            assert kp.detoured == detour, (function, kp.detour_refused)
            bytes_at[event] = (kp.arm_addr, s.engine.kread(kp.arm_addr, 5))
        setup = " && ".join(f"echo 'p:lx/{e} {f} {a}' >> {TR}/kprobe_events"
                            for e, f, a in PROBES)  # fmt: skip
        out = s.command(f"echo 8192 > {TR}/buffer_size_kb && echo > {TR}/trace && {setup} "
                        f"&& echo 1 > {TR}/events/lx/enable && echo configured")  # fmt: skip
        assert "configured" in out, out
        s.command("true")  # a hit in flight when the probes changed rings now
        stops, spilled = s.engine.stats.bp, tracer.fast_spilled
        s.command(WORKLOAD, timeout=300)
        # The only stops: hits a full ring handed to the host (lossless
        # mode), when the host, on a loaded machine, drained too late.
        stops = s.engine.stats.bp - stops - (tracer.fast_spilled - spilled)
        s.command(f"echo 0 > {TR}/events/lx/enable")
        trace_text = s.command(f"cat {TR}/trace", timeout=120)
        summary = {row["event"]: row for row in tracer.summary()}
    finally:
        s.command(f"echo 0 > {TR}/events/lx/enable; echo > {TR}/kprobe_events")
        for name in list(tracer.probes):
            tracer.remove(name)
    # By pid: the guest's trace prints each pid's latest comm, so the hits of
    # a forked shell before its exec show the new program's name there.
    pids = {e.pid for e in events if e.comm in COMMS}
    ours = Counter((e.pid or 0, e.event, _values(e.fields)) for e in events
                   if e.pid in pids)  # fmt: skip
    theirs = Counter((pid, event, _values(fields))
                     for _comm, pid, event, fields in parse_ftrace(trace_text)
                     if pid in pids)  # fmt: skip
    assert tracer.fast_dropped == 0
    return ours, theirs, stops, bytes_at, summary


def _by_event(events: Counter[tuple[int, str, tuple[int, ...]]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for (_pid, event, _values), n in events.items():
        out[event] += n
    return out


def test_detours_record_what_the_int3_fast_path_and_the_guest_record(busy: Session) -> None:
    s = busy
    text_before, idts_before = _probed_text(s), _idt_digests(s)
    detoured, guest1, stops1, jumps, summary = _run(s, detour=True)
    int3, guest2, stops2, int3s, _ = _run(s, detour=False)
    # While detoured the probed bytes are a jump into qprobes' detour
    # buffers: no hit can raise an exception there.
    lo, hi = s.engine._detour_range()
    for event, (addr, code) in jumps.items():
        assert code[0] == x86insn.JMP_REL32, (event, code.hex())
        assert lo <= addr + 5 + int.from_bytes(code[1:5], "little", signed=True) < hi, event
        assert int3s[event][1][0] == x86insn.INT3, (event, int3s[event][1].hex())
    assert all(row["detour"] for row in summary.values()), summary
    # Every open, read and close of the workload, on both paths and in the guest's own.
    for event, _f, _a in PROBES:
        assert sum(c for (_comm, ev, _), c in detoured.items() if ev == event), event
    assert detoured == guest1
    assert int3 == guest2
    # The same workload again (new pids): the same events per function.
    assert _by_event(detoured) == _by_event(int3)
    assert _by_event(detoured)["ae"] >= 2 * N
    assert stops1 == 0 and stops2 == 0
    # Unregistered: the int3 and then the original bytes are back.
    assert _probed_text(s) == text_before
    assert _idt_digests(s) == idts_before


def test_a_window_ending_in_a_call_keeps_the_return_address(busy: Session) -> None:
    """``__x64_sys_close``'s window ends with ``call close_fd``: the copy
    pushes the original return address, so the guest's own stack trace from
    inside close_fd (a kprobe_events ``stacktrace`` trigger) names
    ``__x64_sys_close``, not a detour buffer."""
    s = busy
    tracer = Tracer(s, lambda e: None, fast=True)
    try:
        tp = tracer.add("p:qp/cl __x64_sys_close fd=+0x70(%di):s32")
        assert tp.kprobe is not None and tp.kprobe.detoured, tp.kprobe
        det = s.engine.detours[tp.kprobe.arm_addr]  # type: ignore[index]
        assert det.window.insns[-1].mnemonic == "call"
        out = s.command(f"echo 'p:lx/cf close_fd' >> {TR}/kprobe_events && "
                        # qp-open's calls only: the busy loops close files
                        # all the time, and their stacks would flood the console.
                        f"echo 'stacktrace if comm == \"qp-open\"' > {TR}/events/lx/cf/trigger && "
                        f"echo > {TR}/trace && echo 1 > {TR}/events/lx/cf/enable && "
                        f"qp-open 3 /etc/hostname; echo 0 > {TR}/events/lx/cf/enable; "
                        f"cat {TR}/trace")  # fmt: skip
    finally:
        s.command(f"echo 0 > {TR}/events/lx/cf/enable; "
                  f"echo '!stacktrace if comm == \"qp-open\"' > {TR}/events/lx/cf/trigger; "
                  f"echo > {TR}/kprobe_events")
        for name in list(tracer.probes):
            tracer.remove(name)
    stacks = []
    for block in out.split("<stack trace>")[1:]:
        frames = []
        for line in block.splitlines()[1:]:
            if not line.strip().startswith("=>"):
                break
            frames.append(line.strip()[2:].strip().split("+")[0])
        stacks.append(frames)
    assert len(stacks) >= 3, out
    for frames in stacks:
        # The unwinder got from close_fd to its caller and on to the syscall
        # entry: the return address it found is __x64_sys_close's own.
        assert "close_fd" in frames and "do_syscall_64" in frames, frames
        assert frames[frames.index("close_fd") + 1] == "__x64_sys_close", frames


def _function_with_extable(s: Session) -> str:
    """A function with exception-table entries whose entry would otherwise
    take a detour (found in the guest's own table)."""
    from qprobes.linux.extable import ExceptionTable

    assert s.symbols is not None and s.kernel is not None and s.kernel.btf is not None
    table = ExceptionTable.load(s.symbols, s.kernel.btf, s.engine.read_data)
    seen = set()
    for insn_addr in table.insns:
        found = s.symbols.resolve(insn_addr)
        if found is None or found[0].name in seen or found[0].kind != "func":
            continue
        sym = found[0]
        seen.add(sym.name)
        code = s.engine.read_data(sym.addr, sym.size)
        if not code.startswith(bytes.fromhex("0f1f440000")):
            continue
        try:
            insns = x86insn.decode_function(code, sym.addr)
            x86detour.select_window(insns, sym.addr + 5, sym.addr, sym.addr + sym.size,
                                    s.engine.indirect_thunks)  # fmt: skip
        except QprobesError:
            continue
        return sym.name
    raise AssertionError("no function with exception-table entries has a detour-able entry")


def test_refusals_stay_on_the_int3_fast_path(busy: Session) -> None:
    s = busy
    extable_fn = _function_with_extable(s)
    cases = [
        ("mntput", "relative jump"),  # +5: a je right after the nop
        ("do_dentry_open", "retpoline thunk"),  # an indirect jump in the function
        (extable_fn, "exception-table"),
    ]
    events: list[TraceEvent] = []
    tracer = Tracer(s, events.append, fast=True)
    off = Tracer(s, events.append, fast=True, detour=False)
    try:
        for i, (function, why) in enumerate(cases):
            tp = tracer.add(f"p:qp/r{i} {function}")
            kp = tp.kprobe
            assert tp.fast_id and kp is not None, tp.slow_reason
            assert not kp.detoured
            assert kp.detour_refused is not None and why in kp.detour_refused, kp.detour_refused
        tp = off.add("p:qp/nd alloc_empty_file")
        assert tp.kprobe is not None and not tp.kprobe.detoured
        assert tp.kprobe.detour_refused is None
        stops, spilled = s.engine.stats.bp, tracer.fast_spilled  # (engine-wide)
        s.command("qp-open 5 /etc/hostname")
        # No stop but the hits a full ring handed over (lossless mode; the
        # host drains late when loaded): counted, and allowed.
        spilled = tracer.fast_spilled - spilled
        assert s.engine.stats.bp - stops == spilled
        rows = {row["event"]: row for row in tracer.summary()}
        assert all(row["fast"] and not row["detour"] for row in rows.values()), rows
        assert rows["qp/r1"]["detour_refused"]
    finally:
        for t in (tracer, off):
            for name in list(t.probes):
                t.remove(name)
    hit = {e.event for e in events}
    assert {"r0", "r1", "nd"} <= hit, hit


def test_probe_inside_a_window_takes_the_detour_out(busy: Session) -> None:
    """A second probe inside a detour's window (vfs_read+7, the second push)
    puts the first back on its int3 before its own int3 goes in: both fire."""
    s = busy
    events: list[TraceEvent] = []
    tracer = Tracer(s, events.append, fast=True)
    try:
        first = tracer.add("p:qp/w0 vfs_read")
        assert first.kprobe is not None and first.kprobe.detoured
        second = tracer.add("p:qp/w1 vfs_read+7")
        assert not first.kprobe.detoured
        assert second.kprobe is not None
        s.command("dd if=/dev/zero of=/dev/null bs=1 count=20 2>/dev/null")
        # The second probe gone, the first takes its detour again.
        tracer.remove("qp/w1")
        assert first.kprobe.detoured, first.kprobe.detour_refused
        s.command("dd if=/dev/zero of=/dev/null bs=1 count=10 2>/dev/null")
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
    dd = Counter(e.event for e in events if e.comm == "dd")
    # Both fired on every read of the first dd, the first alone on the second's.
    assert dd["w1"] >= 20 and dd["w0"] >= dd["w1"] + 10, dd


def test_a_disabled_detoured_probe_is_detoured_again_when_enabled(busy: Session) -> None:
    """Disabling takes the jump out (the probed bytes are the original's);
    enabling puts the int3 back and then the detour, and hits record again."""
    s = busy
    events: list[TraceEvent] = []
    tracer = Tracer(s, events.append, fast=True)
    try:
        tp = tracer.add("p:qp/t0 vfs_read")
        kp = tp.kprobe
        assert kp is not None and kp.detoured and kp.arm_addr is not None
        original = s.engine.detours[kp.arm_addr].window.original
        s.engine.disable_kprobe(kp)
        assert not kp.detoured
        assert s.engine.kread(kp.arm_addr, len(original)) == original
        s.command("dd if=/dev/zero of=/dev/null bs=1 count=10 2>/dev/null")
        tracer.drain()
        assert not [e for e in events if e.comm == "dd"]
        s.engine.enable_kprobe(kp)
        assert kp.detoured, kp.detour_refused
        assert s.engine.kread(kp.arm_addr, 1)[0] == 0xE9  # jmp rel32
        s.command("dd if=/dev/zero of=/dev/null bs=1 count=10 2>/dev/null")
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
    assert sum(1 for e in events if e.comm == "dd") >= 10


def test_detach_with_detours_leaves_the_guest_clean(busy: Session) -> None:
    """Detach (Session.close's path) with detoured probes still armed, the
    busy loop running: text and IDT as before, dmesg clean afterwards."""
    s = busy
    engine = s.engine
    engine.detach()
    text_before, idts_before = _text_digest(s), _idt_digests(s)
    engine.attach()
    tracer = Tracer(s, lambda e: None, fast=True)
    for event, function, args in PROBES:
        tp = tracer.add(f"p:qp/{event} {function} {args}")
        assert tp.kprobe is not None and tp.kprobe.detoured, tp.kprobe
    s.command("qp-open 20 /etc/hostname")
    s.run(timeout=1)
    engine.detach()
    assert not engine.detours
    assert _text_digest(s) == text_before
    assert _idt_digests(s) == idts_before
    text = console_after(s, 2)
    assert not bad_lines(text), bad_lines(text)[:5]
    engine.attach()  # for the module's other tests


def test_recover_puts_a_detoured_site_back() -> None:
    """A controller with detoured probes SIGKILLed on an attached 2-vCPU
    guest: ``qprobes attach --recover`` takes the jumps out (int3 and the
    original tail first, then the first byte, from the journal's record of
    each window) and the guest runs on clean with its text as before."""
    import subprocess
    import time

    from qprobes.machine.linux import LINUX_PROMPT
    from tests.integration.attached import BAD, CLI, busy_guest, snapshot

    machine, addrs = busy_guest()
    try:
        address = str(machine.gdb_socket)
        start, size = machine.config.reserved
        reserve = f"{start:#x}:{size:#x}"
        out = machine.console.command("grep -E ' alloc_empty_file$' /proc/kallsyms",
                                      LINUX_PROMPT, timeout=120)  # fmt: skip
        found = re.search(r"([0-9a-f]{16}) \w alloc_empty_file", str(out))
        assert found, out
        addrs.append(int(found.group(1), 16))
        before = snapshot(address, addrs)
        proc = subprocess.Popen([*CLI, "trace", "--attach", address, "--reserve", reserve, "-q",
                                 "--fast", "--no-watchdog", "p:ae alloc_empty_file",
                                 "p:vr vfs_read count=%dx"],
                                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True)  # fmt: skip
        assert proc.stderr is not None
        seen, deadline = "", time.monotonic() + 180
        while "Ctrl-C to stop" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "Ctrl-C to stop" in seen, seen
        assert seen.count("detoured") == 2, seen
        time.sleep(3)
        proc.kill()
        proc.wait(timeout=30)
        recovered = subprocess.run([*CLI, "attach", address, "--recover", "--reserve", reserve],
                                   capture_output=True, text=True, timeout=300,
                                   check=False)  # fmt: skip
        assert recovered.returncode == 0, recovered.stderr
        assert "2 probe sites" in recovered.stdout, recovered.stdout
        mark = len(machine.console_text())
        out = machine.console.command("qp-open 5 /etc/hostname; echo qp-alive; dmesg",
                                      LINUX_PROMPT, timeout=120)  # fmt: skip
        text = str(out) + machine.console_text()[mark:]
        assert "qp-alive" in text
        assert not [line for line in text.splitlines() if BAD.search(line)], text[-3000:]
        assert snapshot(address, addrs) == before, "the detoured sites are not all restored"
    finally:
        machine.shutdown()


@pytest.mark.parametrize("detour", [False, True], ids=["int3", "detour"])
def test_a_probe_on_a_call_is_on_the_fast_path(busy: Session, detour: bool) -> None:
    """A probe on a ``call rel32`` (vfs_read's first) runs boosted, as a push of
    the original return address and a jmp to the callee, so it records in
    the guest with no stop, detoured or on its int3; the guest's own probe on
    vfs_read's entry (every read of dd's passes the call) counts the same
    hits, and the callee returns past the probe as before. (The guest's
    kprobe cannot go at the same address: it decodes the function from its
    start, and qprobes' int3 or jump on the way is not one of its own.)"""
    s = busy
    assert s.symbols is not None
    sym = s.symbols.lookup("vfs_read")
    code = s.engine.read_data(sym.addr, sym.size)
    offset = next(i.ip - sym.addr for i in iced_x86.Decoder(64, code, ip=sym.addr)
                  if i.ip > sym.addr + 5 and i.code == iced_x86.Code.CALL_REL32_64)  # fmt: skip
    where = f"vfs_read+{offset:#x}"
    events: list[TraceEvent] = []
    tracer = Tracer(s, events.append, fast=True, detour=detour)
    try:
        out = s.command(f"echo > {TR}/trace && echo 'p:lx/entry vfs_read' >> {TR}/kprobe_events "
                        f"&& echo 1 > {TR}/events/lx/enable && echo configured")  # fmt: skip
        assert "configured" in out, out
        tp = tracer.add(f"p:qp/call {where}")
        kp = tp.kprobe
        assert tp.fast_id and kp is not None, tp.slow_reason
        assert kp.detoured == detour, kp.detour_refused
        stops = s.engine.stats.bp - tracer.fast_spilled
        s.command("dd if=/dev/zero of=/dev/null bs=1 count=300 2>/dev/null; echo dd-done")
        stops = s.engine.stats.bp - tracer.fast_spilled - stops
        s.command(f"echo 0 > {TR}/events/lx/enable")
        trace_text = s.command(f"cat {TR}/trace", timeout=120)
        tracer.drain()
    finally:
        s.command(f"echo 0 > {TR}/events/lx/enable; echo > {TR}/kprobe_events")
        for name in list(tracer.probes):
            tracer.remove(name)
    pids = {e.pid for e in events if e.comm == "dd"}
    ours = sum(1 for e in events if e.pid in pids)
    theirs = sum(1 for _c, pid, _e, _f in parse_ftrace(trace_text) if pid in pids)
    assert ours == theirs >= 300, (ours, theirs)
    assert stops == 0
