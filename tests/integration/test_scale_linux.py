"""Scale on the default Linux guest (2 vCPUs): 10,000 probes armed in one
batch (the probe table grows into the area's second region), their int3s
in place, a workload that hits some of them counted right, and a detach
that puts back every byte of kernel text and every page-table entry; the
stubs find the CPU through GS (Linux's per-CPU cpu_number), not cpuid."""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterator

import pytest

from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.probes.area import MAX_REGIONS, REGION_SIZE
from qprobes.probes.context import HitContext
from qprobes.probes.kprobe import Kprobe
from qprobes.probes.stubs import PERCPU_STRIDE, VAR_PERCPU
from qprobes.target.paging import ADDR_MASK
from tests.conftest import require_vm
from tests.integration.test_detach_linux import bad_lines, console_after

pytestmark = pytest.mark.vm

WANT = 10_000
OPEN = "do_sys_openat2"


@pytest.fixture(scope="module")
def linux() -> Iterator[Session]:
    try:
        session = Session.linux(smp=2)
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise
    try:
        yield session
    finally:
        session.close()


def opens(session: Session, n: int) -> None:
    out = session.command(f"qp-open {n} /etc/hostname && echo qp-opened", timeout=300)
    assert "qp-opened" in out, out[-300:]


def test_stubs_find_the_cpu_through_gs(linux: Session) -> None:
    engine = linux.engine
    assert linux.symbols is not None and "cpu_number" in linux.symbols
    offset = linux.symbols.address("cpu_number")
    assert engine.cpu_number_offset == offset  # the Linux hook plugged it in
    assert "qp_bp_cpu" in engine.stubs.symbols  # the stubs read [GS base + cpu_number]
    seen: list[tuple[int, int, int, int]] = []

    def pre(kp: Kprobe, ctx: HitContext) -> None:
        (cpu,) = struct.unpack("<i", ctx.read(ctx.gs_base + offset, 4))
        record = engine._vars + VAR_PERCPU + PERCPU_STRIDE * ctx.vcpu
        _rsp, gs, _cr3, _tsc = struct.unpack("<QQQQ", engine.read_data(record, 32))
        seen.append((ctx.vcpu, cpu, gs == ctx.gs_base, ctx.regs.rdi & 0xFFFFFFFF))

    kp = linux.kprobe(OPEN, pre)
    try:
        for cpu in (0, 1, 0, 1):
            out = linux.command(f"taskset {1 << cpu} qp-open 5 /etc/hostname && echo qp-ok")
            assert "qp-ok" in out, out[-300:]
    finally:
        linux.unregister(kp)
    assert {v for v, *_ in seen} == {0, 1}, seen[:5]
    # Each hit's frame came from the per-CPU record the stub filed by the
    # guest's own CPU number: the vCPU that stopped, its GS base, its frame
    # (do_sys_openat2's dfd is AT_FDCWD).
    assert all(v == cpu and same for v, cpu, same, _dfd in seen), seen[:5]
    assert all(dfd == 0xFFFFFF9C for *_, dfd in seen), seen[:5]


def text_hash(session: Session) -> str:
    assert session.symbols is not None
    start, end = session.symbols.address("_stext"), session.symbols.address("_etext")
    digest = hashlib.sha256()
    for addr in range(start, end, 1 << 20):
        digest.update(session.engine.read_data(addr, min(1 << 20, end - addr)))
    return digest.hexdigest()


def pmd_entries(session: Session, vbase: int) -> list[int]:
    """The guest's page-directory entries over the area's whole span."""
    target = session.target
    root = session.engine.area.cr3
    out = []
    for k in range(MAX_REGIONS):
        va = vbase + k * REGION_SIZE
        pud = target.read_phys_u64(root + 8 * ((va >> 39) & 511)) & ADDR_MASK
        pmd = target.read_phys_u64(pud + 8 * ((va >> 30) & 511)) & ADDR_MASK
        out.append(target.read_phys_u64(pmd + 8 * ((va >> 21) & 511)))
    return out


def test_10000_probes_armed_in_one_batch_and_put_back(linux: Session) -> None:
    engine = linux.engine
    assert linux.symbols is not None
    engine.detach()  # Session.linux attached: start from a clean guest
    text_before = text_hash(linux)
    engine.attach()
    vbase = engine.area.vbase
    tables_before = pmd_entries(linux, vbase)
    assert tables_before[0] & 1 and not any(e & 1 for e in tables_before[1:])
    funcs = sorted({s.addr for s in linux.symbols if s.kind == "func" and s.size > 0})
    step = max(1, len(funcs) // WANT)
    opener = linux.symbols.address(OPEN)
    pool = [opener, *[a for a in funcs[::step] if a != opener][: WANT - 1]]
    started = time.perf_counter()
    got = linux.kprobe_many(pool, lambda kp, ctx: None)
    took = time.perf_counter() - started
    armed = [kp for kp in got if isinstance(kp, Kprobe)]
    refused = [(a, str(e)) for a, e in zip(pool, got, strict=True) if not isinstance(e, Kprobe)]
    print(f"{len(armed)} armed, {len(refused)} refused in {took:.2f} s")
    assert len(armed) >= WANT * 0.98, refused[:5]
    assert isinstance(got[0], Kprobe), got[0]
    # Every refusal is one line naming its function (or address) and the reason.
    for addr, why in refused:
        found = linux.symbols.resolve(addr)
        assert "\n" not in why and (f"{addr:#x}" in why or (found and found[0].name in why)), why
    # The probe table outgrew the first region: the area has a second one.
    assert engine.probe_table.live == len(armed) and engine.probe_table.size >= 2 * len(armed)
    assert engine.area.regions >= 2
    assert pmd_entries(linux, vbase)[1] & 1
    code = engine._code_bytes([kp.arm_addr for kp in armed])  # type: ignore[misc]
    assert len(code) == len(armed) and set(code.values()) == {0xCC}
    contents = engine.journal_contents()
    assert contents is not None and len(contents.sites) == len(armed)
    # Let the idle guest run: the probes it hits stay armed only if few.
    linux.run(timeout=2)
    hot = [kp for kp in armed if kp.nhit and kp is not got[0]]
    for kp in hot:
        linux.unregister(kp)
    opener_kp = got[0]
    assert isinstance(opener_kp, Kprobe)
    named: list[str] = []

    def count(kp: Kprobe, ctx: HitContext) -> None:
        named.append(ctx.read_string(ctx.regs.rsi))

    opener_kp.pre_handler = count  # the filename is do_sys_openat2's second argument
    opens(linux, 0)
    before = named.count("/etc/hostname")
    opens(linux, 7)
    assert named.count("/etc/hostname") - before == 7, named[-12:]
    engine.detach()
    assert not engine.attached
    printed = console_after(linux, 2)
    assert not bad_lines(printed), bad_lines(printed)[:5]
    assert text_hash(linux) == text_before, "kernel text differs after detach"
    after = pmd_entries(linux, vbase)
    assert not any(e & 1 for e in after), [hex(e) for e in after]
    engine.attach()


def test_a_probe_refused_in_a_batch_is_refused_as_alone(linux: Session) -> None:
    """Regression: the batch's caches change no check's outcome or message."""
    wheres: list[str | int] = ["nmi_handle", "entry_SYSCALL_64", "do_sys_openat2+0x1",
                               "update_curr+0x45", "vfs_read", "do_sys_openat2",
                               "_raw_spin_lock_irqsave", "schedule"]  # fmt: skip
    got = linux.kprobe_many(wheres, lambda kp, ctx: None)
    try:
        refused = [(w, e) for w, e in zip(wheres, got, strict=True) if not isinstance(e, Kprobe)]
        assert {w for w, _ in refused} >= {"nmi_handle", "entry_SYSCALL_64", "do_sys_openat2+0x1"}
        assert isinstance(got[4], Kprobe) and isinstance(got[5], Kprobe)
        for where, err in refused:
            with pytest.raises(QprobesError) as alone:
                linux.kprobe(where, lambda kp, ctx: None)
            assert (type(alone.value), str(alone.value)) == (type(err), str(err))
    finally:
        for kp in got:
            if isinstance(kp, Kprobe):
                linux.unregister(kp)


def test_tracer_adds_many_definitions_in_one_batch(linux: Session) -> None:
    from qprobes.tracing import TraceEvent, Tracer

    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    defs = ["p:qpscale/open do_sys_openat2 path=+0(%si):string", "p:qpscale/nmi nmi_handle",
            "p:qpscale/read vfs_read"]  # fmt: skip
    got = tracer.add_many(defs)
    try:
        assert not isinstance(got[0], QprobesError) and not isinstance(got[2], QprobesError)
        assert isinstance(got[1], QprobesError)
        with pytest.raises(QprobesError) as alone:
            Tracer(linux, events.append).add(defs[1])
        assert str(alone.value) == str(got[1])
        opens(linux, 3)
        named = [e for e in events if e.fields.get("path") == "/etc/hostname"]
        assert len(named) >= 3, events[-5:]
        added = [tp for tp in got if not isinstance(tp, QprobesError)]
        points = len(linux.engine.points)
        gone = tracer.remove_many([tp.name for tp in added] + ["qpscale/none"])
        assert gone[:-1] == [None] * len(added) and str(gone[-1]) == "no event qpscale/none"
        assert not tracer.probes and len(linux.engine.points) == points - len(added)
        assert not any(tp.probe is not None and tp.probe.registered for tp in added)
    finally:
        tracer.remove_many(list(tracer.probes))


def test_fast_definitions_added_in_a_batch_are_detoured_after_it(linux: Session) -> None:
    """Tracer(fast=True).add_many: the recorders go in with the batch, and the
    detours once it is written (a detour's wait runs the guest, which a batch
    must not: its cached pages, its int3s still to write)."""
    from qprobes.tracing import TraceEvent, Tracer

    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append, fast=True)
    defs = ["p:qpscale/fread vfs_read count=%dx:u64", "p:qpscale/fopen do_sys_openat2+0x18"]
    text = linux.engine.read_data(linux.engine.resolve(Kprobe(symbol_name="vfs_read")), 64)
    engine = linux.engine
    runs_in_batch: list[bool] = []
    real_run = engine.run

    def run(*args: object, **kwargs: object) -> object:
        runs_in_batch.append(engine._batch is not None)
        return real_run(*args, **kwargs)  # type: ignore[arg-type]

    engine.run = run  # type: ignore[method-assign]
    try:
        got = tracer.add_many(defs)
    finally:
        del engine.run
    assert not any(runs_in_batch)  # a detour wait that runs the guest comes after the batch
    try:
        assert not any(isinstance(tp, QprobesError) for tp in got), got
        for tp in got:
            assert not isinstance(tp, QprobesError)
            assert tp.fast_id and tp.kprobe is not None, tp.slow_reason
            assert tp.kprobe.detoured, tp.kprobe.detour_refused
        opens(linux, 3)
        tracer.drain()
        assert sum(1 for e in events if e.event == "fopen") >= 3
        assert sum(1 for e in events if e.event == "fread") >= 1
    finally:
        tracer.remove_many(list(tracer.probes))
    addr = linux.engine.resolve(Kprobe(symbol_name="vfs_read"))
    assert linux.engine.read_data(addr, 64) == text


def idt_hashes(session: Session) -> dict[int, str]:
    target = session.target
    out = {}
    for vcpu in target.vcpus:
        idt = target.idt(vcpu)
        paddr = target.translate(idt.base, vcpu).paddr
        out[vcpu] = hashlib.sha256(target.read_phys(paddr, idt.limit + 1)).hexdigest()
    return out


BATCH = 2000


def test_a_batch_unregistered_at_once_puts_back_every_byte(linux: Session) -> None:
    """2,000 function entries (the bench's arm_many order) armed in one batch
    and unregistered in one batch (unregister_many): the kernel text and the
    IDTs as before, every table entry and journal record gone, the guest's
    log clean; a sample of the refusals is what registering alone gives."""
    engine = linux.engine
    assert linux.symbols is not None
    text_before, idt_before = text_hash(linux), idt_hashes(linux)
    journal_before = engine.journal_contents()
    funcs = sorted({s.addr for s in linux.symbols if s.kind == "func" and s.size > 0})
    k = max(1, len(funcs) // BATCH)
    order = [a for i in range(k) for a in funcs[i::k]][:BATCH]
    got = linux.kprobe_many(order, lambda kp, ctx: None)
    armed = [kp for kp in got if isinstance(kp, Kprobe)]
    refused = [(a, e) for a, e in zip(order, got, strict=True) if not isinstance(e, Kprobe)]
    print(f"{len(armed)} armed, {len(refused)} refused")
    assert len(armed) >= BATCH * 0.95, [str(e) for _a, e in refused[:5]]
    assert engine.probe_table.live == len(armed) and text_hash(linux) != text_before
    # Refusals as alone: the first ten of them, and ten that were armed in
    # the batch register alone as well once the batch is gone (below).
    for addr, err in refused[:10]:
        with pytest.raises(QprobesError) as alone:
            linux.kprobe(addr, lambda kp, ctx: None)
        assert (type(alone.value), str(alone.value)) == (type(err), str(err))
    sample = [kp.addr for kp in armed[:: max(1, len(armed) // 10)]]
    results = linux.unregister_many(armed)
    assert results == [None] * len(armed)
    assert not any(kp.registered for kp in armed)
    assert not engine.points and engine.probe_table.live == 0
    assert text_hash(linux) == text_before, "kernel text differs after unregister_many"
    assert idt_hashes(linux) == idt_before
    contents = engine.journal_contents()
    assert contents is not None and journal_before is not None
    assert len(contents.sites) == len(journal_before.sites) == 0
    for addr in sample:
        assert addr is not None
        kp = linux.kprobe(addr, lambda kp, ctx: None)  # armed alone too
        linux.unregister(kp)
    assert text_hash(linux) == text_before
    printed = console_after(linux, 2)
    assert not bad_lines(printed), bad_lines(printed)[:5]
    assert "qp-dmesg-start" in printed
