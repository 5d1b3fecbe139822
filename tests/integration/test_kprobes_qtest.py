"""kprobes on qtest under TCG: every fixup class, transparency, faults, handlers.

One qtest guest for the module. Ground truth for hit counts comes from
single-stepping the same mailbox command through the gdbstub with no probe
armed: each probe's ``nhit`` must equal the number of times the guest
executed its instruction.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from collections.abc import Iterator

import pytest

from qprobes.errors import InstructionError, ProbeError, SymbolError
from qprobes.frontends.qtest import MBOX_RUN, QtestDriver
from qprobes.frontends.session import Session
from qprobes.probes.kprobe import Kprobe, KprobeStatus
from tests.integration.qtest_fixtures import instructions, qtest_session, step_until

pytestmark = pytest.mark.vm

CALLS = 3  # checked calls per target run


@pytest.fixture(scope="module")
def guest(qtest_image: object) -> Iterator[tuple[Session, QtestDriver]]:
    with qtest_session() as pair:
        yield pair


@pytest.fixture(scope="module")
def traces(guest: tuple[Session, QtestDriver]) -> dict[str, Counter[int]]:
    """Executed-instruction counts of `run NAME 3` for every target, by stepping."""
    session, q = guest
    assert not session.engine.points
    return {
        t.name: q.trace(MBOX_RUN, (t.index << 32) | CALLS, [(t.addr, t.end)]) for t in q.targets
    }


@pytest.fixture(autouse=True)
def no_probes_left(guest: tuple[Session, QtestDriver]) -> Iterator[None]:
    yield
    session, _ = guest
    for point in list(session.engine.points.values()):
        for kp in list(point.kprobes):
            session.engine.unregister_kprobe(kp)


TARGETS = [
    "t_riprel_load", "t_riprel_store", "t_riprel_cmp_imm", "t_riprel_gs", "t_pushf", "t_popf",
    "t_cli_sti", "t_iretq", "t_ret", "t_ret_imm", "t_lret", "t_call_rel", "t_call_reg",
    "t_call_mem", "t_lcall_mem", "t_jmp_reg", "t_jmp_mem", "t_ljmp_mem", "t_jmp_rel8",
    "t_jmp_rel32", "t_jcc", "t_loop", "t_int3", "t_fault", "t_self_step", "t_hot", "t_mixed",
    "t_div",
]  # fmt: skip


# ff /3 and ff /5 (t_lcall_mem, t_ljmp_mem): refused, as Linux refuses them.
FAR_INDIRECT = ("lcall", "ljmp")


def probed(insn: object) -> bool:
    """Whether qprobes accepts a probe on this target instruction: all but the
    ud2 guards (never run) and the far indirect call/jmp."""
    return insn.mnemonic not in ("ud2", *FAR_INDIRECT)  # type: ignore[attr-defined]


def test_every_target_is_covered(guest: tuple[Session, QtestDriver]) -> None:
    _, q = guest
    assert sorted(TARGETS) == sorted(t.name for t in q.targets)


@pytest.mark.parametrize("boost", [True, False], ids=["boosted", "single-step"])
@pytest.mark.parametrize("name", TARGETS)
def test_each_instruction_one_at_a_time(
    guest: tuple[Session, QtestDriver], traces: dict[str, Counter[int]], name: str, boost: bool
) -> None:
    """Probe each instruction alone: the target still passes its checks and
    the probe fires exactly as often as the instruction ran."""
    session, q = guest
    target = q.by_name[name]
    expected = traces[name]
    assert expected, f"the trace of {name} saw none of its instructions"
    for insn in instructions(session, target):
        if insn.mnemonic in FAR_INDIRECT:
            with pytest.raises(InstructionError, match=r"far indirect .* AMD ignores REX\.W"):
                session.kprobe(insn.addr, lambda kp, ctx: None, boost=boost)
            continue
        seen: list[int] = []

        def pre(kp: Kprobe, ctx: object, seen: list[int] = seen) -> None:
            seen.append(ctx.regs.rip)  # type: ignore[attr-defined]

        try:
            kp = session.kprobe(insn.addr, pre, boost=boost)
        except InstructionError:
            # Only the ud2 guards after non-returning control transfers are
            # refused, and the guest never runs them.
            assert insn.mnemonic == "ud2" and expected[insn.addr] == 0
            continue
        failures = q.run_target(name, CALLS)
        session.unregister(kp)
        where = f"{name}+{insn.addr - target.addr:#x} ({insn.mnemonic} {insn.op_str})"
        assert failures == 0, f"{where}: {failures} checked calls failed with the probe"
        assert kp.nhit == expected[insn.addr], f"{where}: nhit {kp.nhit}"
        assert seen == [insn.addr] * kp.nhit, f"{where}: pre_handler saw rip {seen}"


@pytest.mark.parametrize("name", TARGETS)
def test_all_instructions_of_a_target_at_once(
    guest: tuple[Session, QtestDriver], traces: dict[str, Counter[int]], name: str
) -> None:
    session, q = guest
    target = q.by_name[name]
    probes = {i.addr: session.kprobe(i.addr, lambda kp, ctx: None)
              for i in instructions(session, target) if probed(i)}  # fmt: skip
    assert q.run_target(name, CALLS) == 0
    got = {addr: kp.nhit for addr, kp in probes.items()}
    assert got == {addr: traces[name][addr] for addr in probes}


def test_every_instruction_of_every_target_at_once(
    guest: tuple[Session, QtestDriver], traces: dict[str, Counter[int]]
) -> None:
    session, q = guest
    probes: dict[int, Kprobe] = {}
    for target in q.targets:
        for i in instructions(session, target):
            if not probed(i):
                continue  # refused (see above)
            # Alternate boosted and single-stepped probes.
            boost = len(probes) % 2 == 0
            probes[i.addr] = session.kprobe(i.addr, lambda kp, ctx: None, boost=boost)
    assert len(probes) > 300
    for target in q.targets:
        before = {a: kp.nhit for a, kp in probes.items()}
        assert q.run_target(target.name, CALLS) == 0, target.name
        delta = {a: kp.nhit - before[a] for a, kp in probes.items() if kp.nhit != before[a]}
        ran = {a: n for a, n in traces[target.name].items() if a in probes}
        assert delta == ran, target.name
    assert q.selfcheck(2) == 0


def test_handlers_see_registers_before_and_after(guest: tuple[Session, QtestDriver]) -> None:
    """t_hot is `nopl; lock incq calls; lea 1(%rdi),%rax; ret`: the pre_handler
    of the lea sees the argument, its post_handler sees rax = rdi + 1, and a
    kretprobe sees the same value returned."""
    session, q = guest
    target = q.by_name["t_hot"]
    lea = next(i for i in instructions(session, target) if i.mnemonic == "lea")
    pre: list[int] = []
    post: list[tuple[int, int, int]] = []
    rets: list[tuple[int, int]] = []
    session.kprobe(
        lea.addr,
        lambda kp, ctx: pre.append(ctx.regs.rdi) and None,
        post_handler=lambda kp, ctx, flags: post.append((ctx.regs.rdi, ctx.regs.rax, ctx.regs.rip)),
    )
    session.kretprobe("t_hot", lambda rp, ctx: rets.append((ctx.entry_regs["rdi"], ctx.retval)))
    assert q.run_target("t_hot", 4) == 0
    assert len(pre) == len(post) == len(rets) == 4
    for rdi, (prdi, rax, rip) in zip(pre, post, strict=True):
        assert prdi == rdi and rax == rdi + 1 and rip == lea.addr + lea.length
    assert all(ret == arg + 1 for arg, ret in rets)


def test_pre_handler_can_change_registers(guest: tuple[Session, QtestDriver]) -> None:
    """A pre_handler that skips `lea` and sets rax itself changes t_hot's
    result: the guest's own check then reports the calls as failed."""
    session, q = guest
    lea = next(i for i in instructions(session, q.by_name["t_hot"]) if i.mnemonic == "lea")

    def skip(kp: Kprobe, ctx: object) -> bool:
        regs = ctx.regs  # type: ignore[attr-defined]
        regs.rax = regs.rdi + 2
        regs.rip = lea.addr + lea.length
        return True

    session.kprobe(lea.addr, skip)
    assert q.run_target("t_hot", 3) == 3


def test_fault_in_slot_is_handled_by_the_guest(guest: tuple[Session, QtestDriver]) -> None:
    """t_fault's load page-faults in the slot; the guest's own extable fixup
    must see the fault at the original address, boosted or single-stepped."""
    session, q = guest
    target = q.by_name["t_fault"]
    symbols = session.symbols
    assert symbols is not None
    faulting = [i for i in instructions(session, target) if i.op_str == "rax, qword ptr [rax]"]
    assert faulting, [f"{i.mnemonic} {i.op_str}" for i in instructions(session, target)]
    assert len(faulting) == 1
    for boost in (True, False):
        traps: list[int] = []
        faults = session.engine.stats.faults
        kp = session.kprobe(
            faulting[0].addr,
            lambda kp, ctx: None,
            boost=boost,
            fault_handler=lambda kp, ctx, trapnr, traps=traps: traps.append(trapnr) and False,
        )
        assert q.run_target("t_fault", 2) == 0
        session.unregister(kp)
        assert kp.nhit == 2
        assert session.engine.stats.faults == faults + 2  # each fault came to the host
        # Only a single-stepped copy has a current kprobe whose fault_handler runs.
        assert traps == ([] if boost else [14, 14])
    assert all(k.status is KprobeStatus.NONE for k in session.engine.kcb.values())


# Conditions of jcc by its low nibble (SDM Vol. 2, Jcc), from rflags.
_CF, _PF, _ZF, _SF, _OF = 0x1, 0x4, 0x40, 0x80, 0x800


def _jcc_taken(cc: int, f: int) -> bool:
    cf, pf, zf = bool(f & _CF), bool(f & _PF), bool(f & _ZF)
    sf, of = bool(f & _SF), bool(f & _OF)
    base = [of, cf, zf, cf or zf, sf, pf, sf != of, zf or sf != of][cc >> 1]
    return base != bool(cc & 1)


def _branch_cc(insn: object) -> int | None:
    """The condition nibble of a jcc, None for an unconditional jmp."""
    raw = insn.raw  # type: ignore[attr-defined]
    while raw[0] in (0x2E, 0x3E):
        raw = raw[1:]
    if raw[0] == 0x0F:
        return raw[1] & 0x0F
    if 0x70 <= raw[0] <= 0x7F:
        return raw[0] & 0x0F
    return None


@pytest.mark.parametrize("name", ["t_jcc", "t_jmp_rel8", "t_jmp_rel32"])
def test_boosted_branch_with_a_post_handler_resumes_where_the_branch_goes(
    guest: tuple[Session, QtestDriver], name: str
) -> None:
    """A boostable jcc/jmp with a post_handler is single-stepped: the guest
    resumes at the branch target when it is taken and right after the branch
    when it is not, exactly, as the flags at the int3 decide."""
    session, q = guest
    branches = [i for i in instructions(session, q.by_name[name])
                if i.mnemonic.startswith("j") and i.is_relative_branch]  # fmt: skip
    assert len(branches) >= (18 if name == "t_jcc" else 2)
    outcomes: Counter[str] = Counter()
    boosted = 0
    for insn in branches:
        flags: list[int] = []
        after: list[int] = []
        kp = session.kprobe(
            insn.addr,
            lambda kp, ctx, flags=flags: flags.append(ctx.regs.eflags) and None,
            post_handler=lambda kp, ctx, f, after=after: after.append(ctx.regs.rip),
            boost=True,
        )
        # Boostable (all but the 2e-prefixed jcc), yet stepped for the post_handler.
        boosted += session.engine.points[insn.addr].boosted
        calls = 12 if name == "t_jcc" else 2
        assert q.run_target(name, calls) == 0, f"{insn.mnemonic} at {insn.addr:#x}"
        session.unregister(kp)
        assert kp.nhit == len(flags) == len(after) > 0
        cc = _branch_cc(insn)
        for f, rip in zip(flags, after, strict=True):
            taken = cc is None or _jcc_taken(cc, f)
            outcomes["taken" if taken else "not taken"] += 1
            want = insn.branch_target if taken else insn.next_addr
            assert rip == want, f"{insn.mnemonic} at {insn.addr:#x}: {rip:#x}, want {want:#x}"
    assert boosted >= len(branches) - 1
    if name == "t_jcc":
        assert outcomes["taken"] and outcomes["not taken"], outcomes


@pytest.mark.parametrize("boost", [True, False], ids=["boosted", "single-step"])
def test_divide_error_in_a_slot_reaches_the_guest_at_the_probe(
    guest: tuple[Session, QtestDriver], boost: bool
) -> None:
    """t_div's divq raises #DE in the slot on every second call: the guest's
    own handler must see it at the probe address (its exception-table
    lookup by rip is checked by the self-check), and the engine must be
    left with no step in progress."""
    session, q = guest
    engine = session.engine
    div = next(i for i in instructions(session, q.by_name["t_div"]) if i.mnemonic == "div")
    traps: list[int] = []
    faults = engine.stats.faults
    kp = session.kprobe(
        div.addr,
        lambda kp, ctx: None,
        boost=boost,
        fault_handler=lambda kp, ctx, trapnr: traps.append(trapnr) and False,
    )
    assert engine.points[div.addr].boosted == boost
    assert q.run_target("t_div", 4) == 0
    session.unregister(kp)
    assert kp.nhit == 4
    assert engine.stats.faults == faults + 2  # calls 1 and 3 divide by zero
    assert traps == ([] if boost else [0, 0])
    assert all(k.status is KprobeStatus.NONE for k in engine.kcb.values())
    assert engine._ss_active == 0


def test_probe_lost_when_the_guest_rewrites_its_int3(
    guest: tuple[Session, QtestDriver], caplog: pytest.LogCaptureFixture
) -> None:
    """The guest (here: the gdbstub on its behalf) rewrites the byte qprobes
    armed: the next check reports the probe lost once, takes it out of the
    probe table, and unregistering leaves the guest's new code alone."""
    import logging

    session, q = guest
    engine = session.engine
    target = q.by_name["t_hot"]
    original = session.target.read(target.addr, 5)
    assert original == bytes.fromhex("0f1f440000")
    kp = session.kprobe("t_hot", lambda kp, ctx: None)
    assert q.run_target("t_hot", 1) == 0 and kp.nhit == 1
    engine.lost_check_interval = 0.0
    try:
        with caplog.at_level(logging.WARNING, logger="qprobes.probes.engine"):
            session.target.write(target.addr, b"\x90" * 5)  # like ftrace patching +0
            assert q.run_target("t_hot", 2) == 0  # checked by run() while stopped
            assert kp.lost and engine.points[target.addr].lost
            assert not engine.points[target.addr].armed
            assert target.addr not in engine._ptable
            assert q.run_target("t_hot", 1) == 0
            with pytest.raises(ProbeError, match="t_hot: the probe there was lost"):
                session.kprobe("t_hot", lambda kp, ctx: None)
            session.unregister(kp)
        lost = [r.getMessage() for r in caplog.records if "probe lost" in r.getMessage()]
        assert lost == ["probe lost: the guest rewrote t_hot"]
        assert kp.nhit == 1
        assert session.target.read(target.addr, 5) == b"\x90" * 5  # not written back
    finally:
        engine.lost_check_interval = 1.0
        session.target.write(target.addr, original)
    assert q.selfcheck() == 0


def test_aggregate_probes_and_enable_disable(guest: tuple[Session, QtestDriver]) -> None:
    session, q = guest
    calls: list[str] = []
    a = session.kprobe("t_mixed", lambda kp, ctx: calls.append("a") and None)
    b = session.kprobe("t_mixed", lambda kp, ctx: calls.append("b") and None)
    assert q.run_target("t_mixed", 2) == 0
    assert calls == ["a", "b", "a", "b"] and a.nhit == b.nhit == 2
    session.engine.disable_kprobe(a)
    assert q.run_target("t_mixed", 1) == 0
    assert calls[4:] == ["b"] and a.nhit == 2 and b.nhit == 3
    session.engine.disable_kprobe(b)
    target = q.by_name["t_mixed"]
    assert session.target.read(target.addr, 1) != b"\xcc"  # fully disarmed
    assert q.run_target("t_mixed", 1) == 0
    assert a.nhit == 2 and b.nhit == 3
    session.engine.enable_kprobe(a)
    assert q.run_target("t_mixed", 1) == 0
    assert a.nhit == 3 and b.nhit == 3
    session.unregister(a)
    session.unregister(b)
    assert session.target.read(target.addr, 5) == bytes.fromhex("0f1f440000")


def test_jprobe_runs_guest_code_with_the_arguments(guest: tuple[Session, QtestDriver]) -> None:
    session, q = guest
    symbols = session.symbols
    assert symbols is not None
    scratch = symbols.address("qtest_4k_area") + 0x800
    session.target.write(scratch, bytes(16))
    host_args: list[int] = []
    code = f"""
        mov rax, {scratch:#x}
        add qword ptr [rax], 1
        mov [rax + 8], rdi
        xor edi, edi            /* clobbers: jprobe_return must restore it */
        jmp jprobe_return
    """
    jp = session.jprobe("t_hot", entry=code, handler=lambda jp, ctx: host_args.append(ctx.regs.rdi))
    assert q.run_target("t_hot", 3) == 0  # the clobbered rdi was restored
    count, last = struct.unpack("<QQ", session.target.read(scratch, 16))
    assert count == 3 == jp.nhit
    assert last == host_args[-1]
    session.unregister(jp)


def test_kretprobe_entry_handler_can_decline(guest: tuple[Session, QtestDriver]) -> None:
    session, q = guest
    rets: list[int] = []
    seen = iter(range(100))
    rp = session.kretprobe(
        "t_hot", lambda rp, ctx: rets.append(ctx.retval),
        entry_handler=lambda rp, ctx: next(seen) % 2 == 1,  # decline every second call
    )  # fmt: skip
    assert q.run_target("t_hot", 4) == 0
    assert len(rets) == 2 and rp.nhit == 2 and not rp.instances
    session.unregister(rp)


def test_unregister_drains_a_vcpu_in_mid_step(guest: tuple[Session, QtestDriver]) -> None:
    session, q = guest
    engine = session.engine
    kp = session.kprobe("t_mixed", lambda kp, ctx: None, boost=False)
    q.post(MBOX_RUN, (q.by_name["t_mixed"].index << 32) | 1)
    engine.run(until=lambda: any(k.status is KprobeStatus.HIT_SS for k in engine.kcb.values()),
               timeout=30)  # fmt: skip
    assert any(k.status is KprobeStatus.HIT_SS for k in engine.kcb.values())
    session.unregister(kp)
    assert all(k.status is KprobeStatus.NONE for k in engine.kcb.values())
    assert q.selfcheck() == 0


@pytest.mark.parametrize("stop_at", ["qp_bp_entry", "qp_bp_ours"])
def test_int3_hit_after_its_probe_was_removed(
    guest: tuple[Session, QtestDriver], stop_at: str
) -> None:
    """A vCPU inside the #BP stub when the probe goes away resumes at the probe address."""
    session, q = guest
    engine = session.engine
    kp = session.kprobe("t_hot", lambda kp, ctx: None)
    q.post(MBOX_RUN, (q.by_name["t_hot"].index << 32) | 1)
    step_until(session, engine.stubs[stop_at])
    session.unregister(kp)
    assert kp.nhit == 0
    assert q.run_target("t_hot", 2) == 0  # and the command posted above completed too


def test_bad_input_is_refused_cleanly(guest: tuple[Session, QtestDriver]) -> None:
    session, q = guest
    target = q.by_name["t_riprel_cmp_imm"]
    text = session.target.read(target.addr, target.size)
    with pytest.raises(SymbolError, match="unknown symbol"):
        session.kprobe("no_such_function", lambda kp, ctx: None)
    with pytest.raises(ProbeError, match="not an instruction boundary"):
        session.kprobe(target.addr + 1, lambda kp, ctx: None)
    with pytest.raises(ProbeError, match="qprobes' own guest area"):
        session.kprobe(session.engine.stubs["qp_bp_entry"], lambda kp, ctx: None)
    handler = session.engine.original_handlers[3]
    with pytest.raises(ProbeError, match="handler for vector 3"):
        session.kprobe(handler, lambda kp, ctx: None)
    assert session.target.read(target.addr, target.size) == text
    assert not session.engine.points
    assert q.selfcheck() == 0


def test_unprobeable_instruction_is_refused(guest: tuple[Session, QtestDriver]) -> None:
    """hlt cannot run out of line; qtest's idle loop or traps hold one where available."""
    session, _ = guest
    symbols = session.symbols
    assert symbols is not None
    for sym in symbols:
        if sym.kind != "func" or not sym.size or sym.name.startswith(("t_", "qp_")):
            continue
        code = session.target.read(sym.addr, sym.size)
        for insn in instructions_in(code, sym.addr):
            if insn.mnemonic in ("hlt", "ud2", "int1", "sysretq", "swapgs"):
                with pytest.raises(InstructionError, match="cannot probe"):
                    session.kprobe(insn.addr, lambda kp, ctx: None)
                return
    pytest.skip("qtest has no unprobeable instruction outside its targets")


def instructions_in(code: bytes, addr: int) -> list[object]:
    from qprobes.arch.x86_64 import insn as x86insn

    try:
        return list(x86insn.decode_function(code, addr))
    except InstructionError:
        return []


@pytest.mark.parametrize("smp", [1, 2])
def test_detach_restores_text_idt_and_page_tables(qtest_image: object, smp: int) -> None:
    """`qprobes qtest`: every target instruction probed under the self-check,
    then detach; the kernel text, IDT and page tables hash as before attaching
    and the guest still passes its self-check."""
    import io

    from qprobes.frontends import api

    out = io.StringIO()
    assert api.qtest_probe_all(smp=smp, out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "qtest: selfcheck 28 passed, 0 failed" in text
    assert "identical to before attaching" in text
    hits = re.search(r"(\d+) probes armed: (\d+) hits", text)
    assert hits and int(hits.group(1)) > 400 and int(hits.group(2)) > 2000


def test_everything_through_the_gdbstub_alone(qtest_image: object) -> None:
    """No /proc/PID/mem (as when attached to someone else's QEMU): frames,
    data and records all go through the gdbstub, and the results are the same."""
    with qtest_session(host_memory=False) as (session, q):
        assert session.hostmem is None
        probes = []
        for name in ("t_hot", "t_call_rel", "t_pushf", "t_riprel_gs", "t_fault", "t_self_step"):
            for i, insn in enumerate(instructions(session, q.by_name[name])):
                if probed(insn):
                    probes.append(session.kprobe(insn.addr, lambda kp, ctx: None, boost=i % 2 == 0))
        rets: list[int] = []
        session.kretprobe("t_hot", lambda rp, ctx: rets.append(ctx.retval))
        out = session.command("selfcheck 2")
        assert "qtest: selfcheck 28 passed, 0 failed" in out, out
        entries = {q.by_name[n].addr for n in ("t_hot", "t_call_rel", "t_pushf", "t_fault")}
        assert all(kp.nhit >= 2 for kp in probes if kp.addr in entries)
        assert sum(kp.nhit for kp in probes) > 50
        assert rets and session.engine.stats.faults > 0


@pytest.mark.parametrize("stop_at", ["qp_bp_entry", "qp_bp_ring"])
def test_detach_while_a_vcpu_is_inside_a_stub(qtest_image: object, stop_at: str) -> None:
    """All-stop mode can stop a vCPU inside qprobes' own code: detaching must
    walk it out before the area's pages go away."""
    with qtest_session() as (session, q):
        engine = session.engine
        kp = session.kprobe("t_hot", lambda kp, ctx: None)
        vcpu = session.target.vcpus[0]
        q.post(MBOX_RUN, (q.by_name["t_hot"].index << 32) | 1)
        step_until(session, engine.stubs[stop_at])
        area = engine.area.vbase
        engine.detach()
        assert not area <= session.target.read_register("rip", vcpu) < area + (2 << 20)
        # The probe went away before the vCPU was walked out of the stub: it
        # resumes at the probe address and runs t_hot with no probe.
        assert kp.nhit == 0
        assert session.target.read(kp.addr, 5) == bytes.fromhex("0f1f440000")
        out = session.command("selfcheck")
        assert "qtest: selfcheck 28 passed, 0 failed" in out


def test_dropped_connection_is_an_error_then_reconnect_restores(qtest_image: object) -> None:
    """A dropped gdbstub connection raises a clear error; qprobes reconnects to
    detach, and the guest runs on with nothing of qprobes' left in it."""
    import socket as socketmod

    from qprobes.errors import ConnectionClosedError
    from qprobes.frontends.api import guest_digest

    with qtest_session(attach=False) as (session, q):
        pristine = guest_digest(session)
        session.engine.attach()
        kp = session.kprobe("t_hot", lambda kp, ctx: None, boost=False)
        assert q.run_target("t_hot", 2) == 0 and kp.nhit == 2
        session.target.client.conn._sock.shutdown(socketmod.SHUT_RDWR)  # the "network" drops
        with pytest.raises(ConnectionClosedError):
            q.run_target("t_hot", 1)
        session.reconnect()
        session.engine.detach()
        assert guest_digest(session) == pristine
        assert "qtest: selfcheck 28 passed, 0 failed" in session.command("selfcheck")
