"""qprobes and the guest's own ftrace on the same function entry.

A qprobes probe at ``SYM`` (an ftrace site) is armed on the instruction
after the site, so the guest can still trace the function, with its
function tracer and its own kprobe_events at once, and both tools count the
same calls. Where the next instruction is not enough (a branch goes to it,
it is a jump-label site, the guest attached a direct trampoline or an
IPMODIFY ops), registration is refused before anything is written.
"""

from __future__ import annotations

import re
import struct
import time
from collections import Counter

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import ProbeError
from qprobes.frontends.session import Session
from qprobes.linux.ftrace import FtraceRecords
from qprobes.probes.context import HitContext
from qprobes.probes.ftrace_site import branches_to
from qprobes.probes.kprobe import Kprobe
from qprobes.tracing import TraceEvent, Tracer

pytestmark = pytest.mark.vm

TR = "/sys/kernel/tracing"
NOP5 = bytes.fromhex("0f1f440000")
READS = 200  # dd bs=1 count=READS: that many vfs_read calls by dd


def records(s: Session) -> FtraceRecords:
    assert isinstance(s.engine.ftrace, FtraceRecords)
    return s.engine.ftrace


def addr_of(s: Session, name: str) -> int:
    assert s.symbols is not None
    return s.symbols.address(name)


def test_records_match_the_kernels_own_count(linux: Session) -> None:
    fr = records(linux)
    fresh = FtraceRecords(fr.layout, fr.pages_start, linux.engine.read_data)
    t0 = time.monotonic()
    fresh._pages = []
    fresh.refresh()
    took = time.monotonic() - t0
    # The kernel lists every record it keeps (init code's are freed after boot).
    listed = linux.command(f"wc -l < {TR}/available_filter_functions")
    print(f"{len(fresh)} ftrace records, read in {took * 1000:.1f} ms")
    assert len(fresh) == int(listed.strip())
    # include/linux/ftrace.h (6.1): the flags, from the kernel's own BTF.
    assert (fr.layout.fl_enabled, fr.layout.fl_direct) == (1 << 31, 1 << 24)
    assert fr.layout.ref_mask == (1 << 23) - 1
    site = fr.site(addr_of(linux, "vfs_read"))
    assert site is not None and site.refs == 0 and not site.enabled
    assert fr.site(addr_of(linux, "vfs_read") + 5) is None


def parse_guest_trace(text: str) -> list[tuple[str, str, int]]:
    """(kind, comm, pid) per line of the guest's trace; markers as ('MARK:text', ...)."""
    rows = []
    line_re = re.compile(r"^\s*(.+)-(\d+)\s+\[\d+\]\s+\S+\s+[\d.]+: (.*)$")
    for line in text.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        comm, pid, rest = m.group(1).strip(), int(m.group(2)), m.group(3)
        if rest.startswith("tracing_mark_write: "):
            kind = "MARK:" + rest.split(": ", 1)[1].strip()
        elif rest.startswith("vfs_read <-"):
            kind = "function"
        elif rest.startswith("lxp: (vfs_read+0x0/"):
            kind = "p"
        elif rest.startswith("lxr: (") and "<- vfs_read)" in rest:
            kind = "r"
        else:
            kind = "other:" + rest
        rows.append((kind, comm, pid))
    return rows


def window(rows: list[tuple[str, str, int]]) -> Counter[tuple[str, str, int]]:
    kinds = [r[0] for r in rows]
    start, end = kinds.index("MARK:START"), kinds.index("MARK:END")
    return Counter(rows[start + 1 : end])


def test_guest_ftrace_and_kprobe_events_work_beside_qprobes_at_entry(linux: Session) -> None:
    vfs_read = addr_of(linux, "vfs_read")
    rows: list[tuple[str, str, int]] = []
    formatted: list[str] = []
    rips: set[int] = set()
    ret_to: set[str] = set()

    def sink(e: TraceEvent) -> None:
        if e.event == "mark":
            rows.append(("MARK:" + str(e.fields["text"]).strip(), e.comm or "", e.pid or 0))
        else:
            rows.append((e.kind, e.comm or "", e.pid or 0))
            formatted.append(e.format())
            if e.kind == "r" and e.comm == "dd":
                ret_to.add(e.ret_to or "")

    assert linux.kernel is not None
    kernel = linux.kernel

    def raw(kp: Kprobe, ctx: HitContext) -> None:
        rips.add(ctx.regs.rip)
        found = kernel.comm_pid(ctx.gs_base, ctx.read)
        comm, pid = found if found is not None else ("", 0)
        rows.append(("raw", comm, pid))

    tracer = Tracer(linux, sink)
    tracer.add("p:qp/qpp vfs_read a=%di")
    tracer.add("r:qp/qpr vfs_read ret=$retval")
    tracer.add("p:qp/mark tracing_mark_write text=+0(%si):ustring")
    kp = linux.kprobe("vfs_read", raw)
    size = linux.symbols.lookup("vfs_read").size  # type: ignore[union-attr]
    assert tracer.describe(tracer.probes["qp/qpr"]).endswith(
        f"(an ftrace site: int3 at vfs_read+0x5/{size:#x})")  # fmt: skip
    assert kp.addr == vfs_read and kp.on_ftrace and kp.arm_addr == vfs_read + 5
    assert linux.engine.kread(vfs_read, 5) == NOP5  # the site is the guest's
    setup = (
        f"echo vfs_read > {TR}/set_ftrace_filter && echo function > {TR}/current_tracer && "
        f"echo 'p:lx/lxp vfs_read a=%di' >> {TR}/kprobe_events && "
        f"echo 'r:lx/lxr vfs_read ret=$retval' >> {TR}/kprobe_events && "
        f"echo 1 > {TR}/events/lx/enable && echo configured"
    )
    try:
        out = linux.command(f"echo > {TR}/trace; {setup}")
        assert "configured" in out and "error" not in out, out
        site = records(linux).site(vfs_read)
        # The function tracer's ops and the kprobes' ftrace ops; a call now.
        assert site is not None and site.enabled and site.refs == 2, site
        assert linux.engine.kread(vfs_read, 1) == b"\xe8"
        linux.command(
            f"echo START > {TR}/trace_marker; dd if=/dev/zero of=/dev/null bs=1 count={READS}; "
            f"echo END > {TR}/trace_marker; echo 0 > {TR}/tracing_on", timeout=120
        )  # fmt: skip
        trace_text = linux.command(f"cat {TR}/trace", timeout=120)
    finally:
        linux.command(
            f"echo 0 > {TR}/events/lx/enable; echo > {TR}/kprobe_events; "
            f"echo nop > {TR}/current_tracer; echo > {TR}/set_ftrace_filter; "
            f"echo 1 > {TR}/tracing_on"
        )
        for name in list(tracer.probes):
            tracer.remove(name)
        linux.unregister(kp)
    dmesg = linux.command("dmesg")
    assert "WARNING" not in dmesg and "ftrace failed" not in dmesg, dmesg[-2000:]
    assert "FUNCTION TRACING IS CORRUPTED" not in trace_text
    assert linux.engine.kread(vfs_read, 6) == NOP5 + linux.engine.kread(vfs_read + 5, 1)
    assert linux.engine.kread(vfs_read + 5, 1) != b"\xcc"

    theirs, ours = window(parse_guest_trace(trace_text)), window(rows)
    dd = [key for key in theirs if key[1] == "dd"]
    assert dd and all(key[0] in ("function", "p", "r") for key in dd), theirs
    pid = dd[0][2]
    assert {k: theirs[(k, "dd", pid)] for k in ("function", "p", "r")} == {
        "function": READS, "p": READS, "r": READS}  # fmt: skip
    assert {k: ours[(k, "dd", pid)] for k in ("p", "r", "raw")} == {
        "p": READS, "r": READS, "raw": READS}  # fmt: skip
    # Every task, every kind: the same calls in the same window.
    for kind in ("p", "r"):
        mine = {key[1:]: n for key, n in ours.items() if key[0] == kind}
        guest = {key[1:]: n for key, n in theirs.items() if key[0] == kind}
        assert mine == guest, (kind, mine, guest)
    assert {key[1:]: n for key, n in ours.items() if key[0] == "raw"} == {
        key[1:]: n for key, n in theirs.items() if key[0] == "function"}  # fmt: skip
    assert rips == {vfs_read}  # the handler sees the registers as at the site
    # The guest's own return probe hooked the return address first; qprobes
    # names the caller behind its trampoline, as the guest does.
    callers = set(re.findall(r" dd-\d+ .* lxr: \((\S+) <- vfs_read\)", trace_text))
    assert len(callers) == 1 and next(iter(callers)).startswith("ksys_read+"), callers
    assert ret_to == callers
    assert any(re.search(r"qpp: \(vfs_read\+0x0/0x[0-9a-f]+\) a=0x", t) for t in formatted)
    print(f"the guest and qprobes both counted {READS} vfs_read calls by dd: {dict(ours)}")


def test_a_branch_to_the_next_instruction_is_refused(linux: Session) -> None:
    # hrtimer_active's seqcount retry loop jumps back to hrtimer_active+5.
    assert linux.symbols is not None
    sym = linux.symbols.lookup("hrtimer_active")
    code = linux.engine.kread(sym.addr, sym.size)
    assert code.startswith(NOP5)
    assert branches_to(x86insn.decode_function(code, sym.addr), sym.addr + 5)
    for register in (lambda: linux.kprobe("hrtimer_active", lambda kp, ctx: None),
                     lambda: linux.kretprobe("hrtimer_active", lambda rp, ctx: None)):  # fmt: skip
        with pytest.raises(ProbeError, match=r"a branch in hrtimer_active goes there too"):
            register()
        assert linux.engine.kread(sym.addr, sym.size) == code
    assert not linux.engine.points
    # Asked for explicitly, the next instruction is an ordinary probe.
    kp = linux.kprobe("hrtimer_active+5", lambda kp, ctx: None)
    try:
        assert not kp.on_ftrace and kp.arm_addr == sym.addr + 5
    finally:
        linux.unregister(kp)
    assert linux.engine.kread(sym.addr, sym.size) == code


def test_a_jump_label_after_the_site_is_refused(linux: Session) -> None:
    fr = records(linux)
    assert linux.symbols is not None
    jumps = set(fr.jump_sites())
    name = None
    for ip in fr.ips:
        found = linux.symbols.resolve(ip)
        if found is not None and found[1] == 0 and ip + 5 in jumps:
            name = found[0].name
            break
    assert name is not None, "no function has a static key right after its ftrace site"
    addr = addr_of(linux, name)
    before = linux.engine.kread(addr, 16)
    # A jump-label site: a 5- or 2-byte nop, or a jmp while its key is on.
    assert before[5:10] == NOP5 or before[5:7] == b"\x66\x90" or before[5] in (0xE9, 0xEB)
    with pytest.raises(ProbeError, match=rf"^{name} is an ftrace site.*jump-label"):
        linux.kprobe(name, lambda kp, ctx: None)
    assert linux.engine.kread(addr, 16) == before and not linux.engine.points


@pytest.mark.parametrize(
    ("flag", "words"),
    [("fl_direct", "direct trampoline"), ("fl_ipmodify", "FTRACE_FL_IPMODIFY")],
)
def test_what_the_guest_attached_at_the_site_is_read_at_arm_time(
    linux: Session, flag: str, words: str
) -> None:
    # As if the guest had attached a BPF trampoline (or a livepatch) to
    # vfs_write: its live record says so. The guest stays stopped meanwhile.
    fr = records(linux)
    vfs_write = addr_of(linux, "vfs_write")
    rec = fr.record(vfs_write)
    assert rec is not None
    flags_at = rec + fr.layout.rec_flags
    saved = linux.engine.read_data(flags_at, 8)
    (flags,) = struct.unpack("<Q", saved)
    text = linux.engine.kread(vfs_write, 16)
    linux.engine.write_data(flags_at, struct.pack("<Q", flags | getattr(fr.layout, flag) | 1))
    try:
        for register in (lambda: linux.kprobe("vfs_write", lambda kp, ctx: None),
                         lambda: linux.kretprobe("vfs_write", lambda rp, ctx: None)):  # fmt: skip
            with pytest.raises(ProbeError, match=words):
                register()
    finally:
        linux.engine.write_data(flags_at, saved)
    assert linux.engine.kread(vfs_write, 16) == text and not linux.engine.points
    kp = linux.kprobe("vfs_write", lambda kp, ctx: None)  # the record is plain again
    try:
        assert kp.on_ftrace and linux.engine.ftrace_site_changed(kp) is None
        # Attached after arming: said at the end of the trace.
        linux.engine.write_data(flags_at, struct.pack("<Q", flags | getattr(fr.layout, flag) | 1))
        try:
            note = linux.engine.ftrace_site_changed(kp)
        finally:
            linux.engine.write_data(flags_at, saved)
        assert note is not None and "while qprobes probed vfs_write+0x5" in note
        assert linux.engine.ftrace_site_changed(kp) is None
    finally:
        linux.unregister(kp)


def test_return_probe_beside_the_function_graph_tracer(linux: Session) -> None:
    # function_graph hooks vfs_read's return address (return_to_handler)
    # from the site, before qprobes' entry probe at vfs_read+5 runs.
    got: list[tuple[str, str | None]] = []
    tracer = Tracer(linux, lambda e: got.append((e.comm or "", e.ret_to)))
    tracer.add("r:qp/gr vfs_read ret=$retval")
    try:
        out = linux.command(f"echo vfs_read > {TR}/set_ftrace_filter && echo function_graph "
                            f"> {TR}/current_tracer && echo configured")  # fmt: skip
        assert "configured" in out and "error" not in out, out
        linux.command("dd if=/dev/zero of=/dev/null bs=1 count=20")
        linux.command(f"echo 0 > {TR}/tracing_on")
        trace_text = linux.command(f"cat {TR}/trace", timeout=120)
    finally:
        linux.command(f"echo nop > {TR}/current_tracer; echo > {TR}/set_ftrace_filter; "
                      f"echo 1 > {TR}/tracing_on")  # fmt: skip
        for name in list(tracer.probes):
            tracer.remove(name)
    assert "vfs_read();" in trace_text and "FUNCTION TRACING IS CORRUPTED" not in trace_text
    dd = [ret for comm, ret in got if comm == "dd"]
    assert len(dd) == 20
    assert all(ret is not None and ret.startswith("ksys_read+") for ret in dd), set(dd)
    assert "WARNING" not in linux.command("dmesg")


def test_jprobe_at_an_ftrace_site(linux: Session) -> None:
    # The jprobe's entry code returns to the probe with the registers saved
    # at the site; the engine then steps the instruction after the site
    # (its int3 is there), not the site again.
    seen: list[int] = []
    jp = linux.jprobe("vfs_read", entry="jmp jprobe_return",
                      handler=lambda jp, ctx: seen.append(ctx.regs.rip))  # fmt: skip
    try:
        assert jp.kp.on_ftrace
        out = linux.command("dd if=/dev/zero of=/dev/null bs=1 count=7 2>&1; echo rc=$?")
    finally:
        linux.unregister(jp)
    assert "7+0 records in" in out and "rc=0" in out, out
    assert len(seen) >= 7 and set(seen) == {addr_of(linux, "vfs_read")}
