"""The guest's ftrace records on fake bytes, and the engine's ftrace-site policy.

Records and pages are laid out as Linux 6.1 does on x86_64 (``struct
ftrace_page`` {next, records, index, order}, ``struct dyn_ftrace`` {ip,
flags}, 16 bytes) with 6.1's ``FTRACE_FL_*`` values from
include/linux/ftrace.h.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from qprobes.errors import ProbeError, SymbolError
from qprobes.linux.ftrace import FtraceLayout, FtraceRecords, parse_records
from qprobes.probes.context import HitContext, PtRegs
from qprobes.probes.ftrace_site import FtraceSite
from qprobes.probes.kprobe import Kprobe, KprobeCtlblk, KprobeStatus
from qprobes.probes.stubs import FRAME_WORDS
from qprobes.symbols.elf import Symbol, SymbolTable
from tests.unit.test_engine_states import FakeTarget, make_engine, point

FL_ENABLED, FL_REGS, FL_IPMODIFY = 1 << 31, 1 << 30, 1 << 26
FL_DISABLED, FL_DIRECT = 1 << 25, 1 << 24
LAYOUT = FtraceLayout(page_next=0, page_records=8, page_index=16, rec_size=16, rec_ip=0,
                      rec_flags=8, fl_enabled=FL_ENABLED, fl_direct=FL_DIRECT,
                      fl_ipmodify=FL_IPMODIFY, fl_disabled=FL_DISABLED,
                      ref_mask=(1 << 23) - 1)  # fmt: skip
START = 0xFFFFFFFF83344928  # ftrace_pages_start
PAGE1, PAGE2, PAGE3 = 0xFFFF888004000000, 0xFFFF888004001000, 0xFFFF888004002000
RECS1, RECS2, RECS3 = 0xFFFF888005000000, 0xFFFF888005100000, 0xFFFF888005200000


class FakeMemory(FakeTarget):
    def u64(self, addr: int, value: int) -> None:
        self.write(addr, struct.pack("<Q", value))

    def page(self, addr: int, nxt: int, records: int, recs: list[tuple[int, int]]) -> None:
        self.write(addr, struct.pack("<QQii", nxt, records, len(recs), 0))
        for i, (ip, flags) in enumerate(recs):
            self.write(records + 16 * i, struct.pack("<QQ", ip, flags))


def two_pages() -> FakeMemory:
    mem = FakeMemory()
    mem.u64(START, PAGE1)
    mem.page(PAGE1, PAGE2, RECS1, [(0xFFFFFFFF81001000, 0), (0xFFFFFFFF81001100, 0)])
    mem.page(PAGE2, 0, RECS2, [(0xFFFFFFFF81002000, FL_ENABLED | FL_REGS | 2)])
    return mem


def test_records_of_every_page_sorted() -> None:
    mem = two_pages()
    records = FtraceRecords(LAYOUT, START, mem.read)
    assert records.ips == [0xFFFFFFFF81001000, 0xFFFFFFFF81001100, 0xFFFFFFFF81002000]
    assert len(records) == 3


def test_site_decodes_the_live_flags() -> None:
    mem = two_pages()
    records = FtraceRecords(LAYOUT, START, mem.read)
    site = records.site(0xFFFFFFFF81002000)
    assert site == FtraceSite(0xFFFFFFFF81002000, FL_ENABLED | FL_REGS | 2, refs=2,
                              enabled=True, direct=False, ipmodify=False)  # fmt: skip
    assert records.site(0xFFFFFFFF81001001) is None  # not a site
    # The guest attaches a BPF trampoline: the next lookup reads it.
    mem.u64(RECS2 + 8, FL_ENABLED | FL_DIRECT | 1)
    site = records.site(0xFFFFFFFF81002000)
    assert site is not None and site.direct and site.refs == 1 and not site.ipmodify
    mem.u64(RECS1 + 16 + 8, FL_IPMODIFY | FL_DISABLED)
    site = records.site(0xFFFFFFFF81001100)
    assert site is not None and site.ipmodify and site.disabled and not site.enabled


def test_a_module_loaded_later_adds_a_page() -> None:
    mem = two_pages()
    records = FtraceRecords(LAYOUT, START, mem.read)
    assert records.site(0xFFFFFFFFC0001000) is None
    mem.page(PAGE3, 0, RECS3, [(0xFFFFFFFFC0001000, 0), (0xFFFFFFFFC0001040, 0)])
    mem.u64(PAGE2, PAGE3)  # ftrace_process_locs links the module's page at the tail
    site = records.site(0xFFFFFFFFC0001040)
    assert site is not None and site.refs == 0
    assert len(records) == 5
    mem.u64(PAGE2, 0)  # the module went away
    assert records.site(0xFFFFFFFFC0001040) is None and len(records) == 3


def test_a_reused_page_is_read_again() -> None:
    mem = two_pages()
    records = FtraceRecords(LAYOUT, START, mem.read)
    # Same page and records addresses, other contents (freed and reused).
    mem.page(PAGE2, 0, RECS2, [(0xFFFFFFFFC0002000, 0)])
    assert records.site(0xFFFFFFFF81002000) is None
    assert records.site(0xFFFFFFFFC0002000) is not None


def test_parse_records_wants_every_byte() -> None:
    data = struct.pack("<QQQQ", 1, 2, 3, 4)
    assert parse_records(data, 2, LAYOUT) == [(1, 2), (3, 4)]
    with pytest.raises(SymbolError):
        parse_records(data, 3, LAYOUT)


def test_jump_label_sites_are_reserved() -> None:
    mem = two_pages()
    table = 0xFFFFFFFF823BB1F0
    # struct jump_entry {s32 code; s32 target; long key;}, relative to each field.
    code_at = 0xFFFFFFFF81001105
    mem.write(table, struct.pack("<iiq", code_at - table, 0, 0))
    mem.write(table + 16, struct.pack("<iiq", 0, 0, 0))  # a freed init entry
    records = FtraceRecords(LAYOUT, START, mem.read, jump_table=(table, table + 32, 0, 16))
    assert records.jump_sites() == [code_at]
    assert "jump-label" in (records.text_reserved(code_at, code_at + 1) or "")
    assert records.text_reserved(code_at + 4, code_at + 6) is not None  # inside its 5 bytes
    assert records.text_reserved(code_at + 5, code_at + 8) is None
    assert records.text_reserved(code_at - 3, code_at) is None


# --- the engine's policy -------------------------------------------------------

FUNC = 0xFFFFFFFF81001000
NOP5 = bytes.fromhex("0f1f440000")


class FakeSites:
    def __init__(self, sites: dict[int, FtraceSite], reserved: set[int] | None = None) -> None:
        self.sites = sites
        self.reserved = reserved or set()

    def site(self, addr: int) -> FtraceSite | None:
        return self.sites.get(addr)

    def text_reserved(self, start: int, end: int) -> str | None:
        hit = [a for a in self.reserved if start <= a < end]
        return f"a jump-label site at {hit[0]:#x}" if hit else None


def engine_with(code: bytes, site: FtraceSite | None, reserved: set[int] | None = None):  # type: ignore[no-untyped-def]
    engine, target = make_engine()
    target.write(FUNC, code)
    engine.symbols = SymbolTable([Symbol("f", FUNC, len(code), "func")])
    engine.ftrace = FakeSites({FUNC: site} if site else {}, reserved)
    return engine, target


def plain(flags: int = 0) -> FtraceSite:
    return LAYOUT.decode(FUNC, flags)


# push rbp; mov rbp, rsp; ... ret
BODY = NOP5 + bytes.fromhex("55 4889e5 4889c8 5d c3")


def test_an_ftrace_site_is_probed_on_the_next_instruction() -> None:
    engine, _ = engine_with(BODY, plain(FL_ENABLED | FL_REGS | 2))
    assert engine._check_ftrace_location(FUNC) == FUNC + 5
    assert engine._check_ftrace_location(FUNC + 5) == FUNC + 5  # not a site
    engine.ftrace = None
    assert engine._check_ftrace_location(FUNC) == FUNC  # no hook: as before


@pytest.mark.parametrize(
    ("code", "flags", "reserved", "words"),
    [
        # a loop back to +5: "jmp f+5" at f+0xc
        (NOP5 + bytes.fromhex("55 4889e5 4885c0 75f7 5d c3"), 0, None,
         ["a branch in f goes there too (f+0xc)", "probe f+0x5 explicitly"]),
        (BODY, FL_ENABLED | FL_DIRECT | 1, None, ["direct trampoline", "FTRACE_FL_DIRECT"]),
        (BODY, FL_ENABLED | FL_IPMODIFY | 1, None, ["FTRACE_FL_IPMODIFY", "may never run"]),
        (BODY, 0, {FUNC + 5}, ["text the kernel patches", "jump-label"]),
        # a "jmp f+5" (eb fd at f+6) in a function whose end does not decode
        (NOP5 + bytes.fromhex("55 ebfd 0f0b ff"), 0, None, ["does not decode"]),
    ],
)  # fmt: skip
def test_refused_where_the_next_instruction_is_not_enough(
    code: bytes, flags: int, reserved: set[int] | None, words: list[str]
) -> None:
    engine, target = engine_with(code, plain(flags), reserved)
    before = dict(target.mem)
    with pytest.raises(ProbeError) as err:
        engine._check_ftrace_location(FUNC)
    message = str(err.value)
    head = "f is an ftrace site, where qprobes probes the next instruction, f+0x5"
    assert message.startswith(head)
    for word in words:
        assert word in message
    assert "\n" not in message
    assert target.mem == before  # nothing written


def test_no_branch_can_go_to_the_next_instruction_of_a_function_that_does_not_decode() -> None:
    # No byte of f can be the displacement of a branch to f+5: f+5 is
    # probed although f's tail does not decode (nor does it need to).
    engine, _ = engine_with(NOP5 + bytes.fromhex("55 0f0b ff"), plain())
    assert engine._check_ftrace_location(FUNC) == FUNC + 5


def hit(rip: int) -> HitContext:
    regs = PtRegs([0] * FRAME_WORDS)
    regs.rip, regs.eflags, regs.rsp = rip, 0x202, 0xFFFFC90000004000
    regs.dirty.clear()
    return HitContext(1, regs, lambda a, n: bytes(n), 0x1000)


def test_a_branch_back_from_the_cold_part_is_seen() -> None:
    engine, _ = engine_with(BODY, plain())
    cold = FUNC + 0x800
    jmp = bytes([0xE9]) + struct.pack("<i", FUNC + 5 - (cold + 5))  # jmp f+5
    engine.target.write(cold, jmp)
    engine.symbols = SymbolTable([Symbol("f", FUNC, len(BODY), "func"),
                                  Symbol("f.cold", cold, len(jmp), "func")])  # fmt: skip
    with pytest.raises(ProbeError, match=r"a branch in f\.cold goes there too \(f\.cold\)"):
        engine._check_ftrace_location(FUNC)


def test_handlers_see_the_registers_as_at_the_site() -> None:
    engine, target = engine_with(BODY, plain())
    seen: list[tuple[str, int]] = []

    def record(what: str) -> Callable[..., None]:
        return lambda kp, ctx, *flags: seen.append((what, ctx.regs.rip))

    site_kp = Kprobe(addr=FUNC, pre_handler=record("pre"), post_handler=record("post"))
    site_kp.on_ftrace = True
    next_kp = Kprobe(addr=FUNC + 5, pre_handler=record("next"))
    assert site_kp.arm_addr == FUNC + 5 and next_kp.arm_addr == FUNC + 5
    p = point(engine, target, FUNC + 5, BODY[5:], 0xFFFFFFFFFEE20000)
    p.kprobes += [site_kp, next_kp]
    assert not p.has_post_handler()  # ran at the hit: no single-step for it
    kcb = KprobeCtlblk()
    ctx = hit(FUNC + 5 + 1)  # the int3 at f+5
    engine._kprobe_handler(kcb, ctx)
    # Linux's kprobe_ftrace_handler: pre_handler at the site, post_handler
    # after the site's nop; a probe at f+5 itself sees f+5.
    assert seen == [("pre", FUNC), ("post", FUNC + 5), ("next", FUNC + 5)]
    assert kcb.status is KprobeStatus.HIT_SS and ctx.regs.rip == p.slot  # stepped from f+5
    assert site_kp.nhit == 1 and next_kp.nhit == 1
    step = hit(p.slot + 1)
    step.regs.eflags |= 0x100
    engine._post_kprobe_handler(kcb, step, 0x4000)  # DR6.BS: the step's own trap
    assert step.regs.rip == FUNC + 6  # push rbp is one byte
    assert [s for s, _ in seen].count("post") == 1  # not again after the step
