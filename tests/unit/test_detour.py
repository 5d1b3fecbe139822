"""Detours (jump-optimized probes): window selection and relocation on byte
tables, and a generated detour buffer run in unicorn with a relocated
rip-relative load and a relocated call.

The unicorn machine is the recorder tests' paged guest: the detour runs at
its address in "qprobes' area", the window's original code and a callee in
"kernel text", a fake recorder copies the frame it is given, and the spill
path (a recorder that found no room) lands where the #BP stub's doorbell
code is, with exactly the frame that stub builds.
"""

from __future__ import annotations

import shutil
import struct

import pytest

from qprobes.arch.x86_64 import detour as D
from qprobes.arch.x86_64 import insn as X
from qprobes.errors import DetourError

TEXT = 0xFFFF_FFFF_8100_0000
THUNKS = (0xFFFF_FFFF_8200_0000, 0xFFFF_FFFF_8200_1000)


def _insns(hexcode: str, start: int = TEXT) -> list[X.Insn]:
    return X.decode_function(bytes.fromhex(hexcode.replace(" ", "")), start)


def _window(hexcode: str, offset: int, thunks: tuple[int, int] | None = THUNKS) -> D.Window:
    insns = _insns(hexcode)
    size = len(bytes.fromhex(hexcode.replace(" ", "")))
    return D.select_window(insns, TEXT + offset, TEXT, TEXT + size, thunks)


NOP5 = "0f1f440000"


def _rel32(next_offset: int, target: int) -> str:
    """A rel32 field, as hex, for an instruction ending at TEXT + next_offset."""
    return (target - (TEXT + next_offset)).to_bytes(4, "little", signed=True).hex()


RET = "c3"

# (function bytes, probe offset, the window's instruction count)
ACCEPTED = [
    # a 7-byte rip-relative load right after the ftrace nop (alloc_empty_file)
    (NOP5 + "488b05 10000000" + RET, 5, 1),
    # push r12; mov r12, rsi (do_sys_openat2+5): 2 instructions, 5 bytes
    (NOP5 + "4154 4989f4 55" + RET, 5, 2),
    # three pushes (vfs_read+5): 6 bytes
    (NOP5 + "4157 4156 4155 4154" + RET, 5, 3),
    # push rbx; mov rbx, rdi; call (down_read+5): the call may end the window
    (NOP5 + "53 4889fb e8 00010000" + RET, 5, 3),
    # a memory access is fine as the first instruction (__x64_sys_close+5)
    (NOP5 + "8b7f70 e8 00010000" + RET, 5, 2),
    # a per-CPU inc gs:[rip + disp32] (up_read+5)
    (NOP5 + "65ff05 00100000" + RET, 5, 1),
    # a jump to the window's first byte is fine (a loop back to the probe)
    (NOP5 + "4889f8 4889f2" + "ebf8" + RET, 5, 2),
    # a call to a retpoline thunk is not an indirect jump
    (NOP5 + "4889f8 4889f2 e8" + _rel32(11 + 5, THUNKS[0]) + RET, 5, 2),
    # a call as the probed instruction: the window is the call alone
    (NOP5 + "e8 00010000" + RET, 5, 1),
    (NOP5 + "3ee8 00010000" + RET, 5, 1),  # ds-prefixed: the same call
]  # fmt: skip


@pytest.mark.parametrize(("code", "offset", "count"), ACCEPTED)
def test_windows_chosen(code: str, offset: int, count: int) -> None:
    w = _window(code, offset)
    assert w.addr == TEXT + offset
    assert len(w.insns) == count
    assert w.length >= 5 and w.length - w.insns[-1].length < 5
    assert w.original == bytes.fromhex(code.replace(" ", ""))[offset : offset + w.length]


def _thunk_jmp(at_offset: int) -> str:
    return "e9" + _rel32(at_offset + 5, THUNKS[0])


REFUSED = [
    # a relative jcc inside the window (mntput+5)
    (NOP5 + "4885ff 7405 4889f8" + RET, 5, "relative jump"),
    # a ret before the window's last instruction (the bytes after it are
    # reached only by jumps from elsewhere)
    (NOP5 + "4889f8 c3 4889f8" + RET, 5, "ends the flow"),
    # the second instruction reads memory: a retried fault would land inside the jump
    (NOP5 + "4889f8 488b17" + RET, 5, "accesses memory"),
    # a branch into the window's second instruction, from later in the function
    (NOP5 + "4889f8 4889f2 90" + "ebfa" + RET, 5, "branches into the window"),
    # an indirect jump anywhere in the function (ff /4)
    (NOP5 + "488b05 10000000 ffe0" + RET, 5, "indirect jump"),
    # a jmp to a retpoline thunk (a compiled indirect jump)
    (NOP5 + "488b05 10000000" + _thunk_jmp(12), 5, "retpoline thunk"),
    # fewer than 5 bytes left in the function
    (NOP5 + "4889f8" + RET, 5, "fewer than 5 bytes"),
    # an int3 (padding) inside the window
    (NOP5 + "4889f8 cc cc cc" + RET, 5, "int3"),
    # not boostable: sti
    (NOP5 + "4889f8 fb 4889f8" + RET, 5, "unstepped"),
    # not an instruction boundary
    (NOP5 + "488b05 10000000" + RET, 6, "boundary"),
]  # fmt: skip


@pytest.mark.parametrize(("code", "offset", "why"), REFUSED)
def test_windows_refused(code: str, offset: int, why: str) -> None:
    with pytest.raises(DetourError) as info:
        _window(code, offset)
    assert why in info.value.reason


def test_a_branch_from_the_cold_part_counts_too() -> None:
    code = NOP5 + "4889f8 4889f2" + RET
    insns = _insns(code)
    cold_at = TEXT + 0x1000
    rel = (TEXT + 8) - (cold_at + 5)
    cold = X.decode_function(bytes.fromhex("e9") + rel.to_bytes(4, "little", signed=True), cold_at)
    D.select_window(insns, TEXT + 5, TEXT, TEXT + 12)
    with pytest.raises(DetourError, match="branches into the window"):
        D.select_window(insns, TEXT + 5, TEXT, TEXT + 12, extra=cold)


AREA = 0xFFFF_FFFF_83B9_0000


def test_relocation_fixes_rip_relative_and_pushes_the_original_return_address() -> None:
    target = TEXT + 0x5000
    code = bytes.fromhex("488b05") + (target - (TEXT + 7)).to_bytes(4, "little", signed=True)
    w = D.Window(tuple(X.decode_function(code, TEXT)))
    rel = D.relocate_window(w, AREA)
    load = X.decode(rel.code, AREA)
    assert load.riprel_target == target
    back = X.decode(rel.code[load.length :], AREA + load.length)
    assert back.mnemonic == "jmp" and back.branch_target == TEXT + 7
    assert rel.copies == ((AREA, 7, TEXT),)

    callee = TEXT + 0x9000
    code = bytes.fromhex("53 4889fb e8") + (callee - (TEXT + 9)).to_bytes(4, "little", signed=True)
    w = D.Window(tuple(X.decode_function(code, TEXT)))
    rel = D.relocate_window(w, AREA)
    insns = X.decode_function(rel.code, AREA)
    assert [i.mnemonic for i in insns] == ["push", "mov", "push", "jmp"]
    push = insns[2]
    assert push.raw[0] == 0x68  # push imm32, sign-extended to the return address
    assert int.from_bytes(push.raw[1:5], "little", signed=True) % 2**64 == TEXT + 9
    assert insns[3].branch_target == callee  # no jmp back: the callee returns to TEXT + 9
    # The fault map: each copy to its original.
    det = D.Detour(w, D.DetourCode(AREA - D.RELOC_OFFSET, b"", AREA, rel.copies), b"")
    assert det.original_rip(insns[1].addr) == TEXT + 1
    assert det.original_rip(push.addr) == TEXT + 4
    assert det.original_rip(insns[3].addr) == TEXT + 4
    assert det.original_rip(AREA - 100) == TEXT


def test_a_return_address_above_the_top_2_gib_is_pushed_in_two_halves() -> None:
    low = 0x0000_7000_0000_1000
    assert D._push_imm64(low)[:5] == bytes.fromhex("488d6424f8")
    assert D._push_imm64(TEXT)[:1] == b"\x68"


# --- a detour buffer in unicorn ---------------------------------------------------

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as UX  # noqa: E402

from qprobes.probes.stubs import PT_REGS_NAMES, assemble_at  # noqa: E402
from tests.unit.test_recorder import make_guest, q  # noqa: E402

needs_as = pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")

KTEXT = 0xFFFF_FFFF_8180_0000  # the probed function
CALLEE = KTEXT + 0x800
KVAR = KTEXT + 0x1000  # what the rip-relative load reads
REC = AREA + 0x4000  # the fake recorder
OUT = AREA + 0x5000  # where it copies its frame
SPILL = AREA + 0x6000  # stands for the #BP stub's doorbell code
GDT = AREA + 0x7000
KSTACK = 0xFFFF_C900_0001_0F00
KERNEL_CS, KERNEL_SS = 0x10, 0x18
GPRS = {"rax": 0x1111, "rbx": 0x2222, "rcx": 0x3333, "rdx": 0x4444, "rsi": 0x5555,
        "rdi": 0x6666, "rbp": 0x7777, "r8": 0x8888, "r9": 0x9999, "r10": 0xAAAA,
        "r11": 0xBBBB, "r12": 0xCCCC, "r13": 0xDDDD, "r14": 0xEEEE, "r15": 0xFFFF}  # fmt: skip


def _reg(name: str) -> int:
    return int(getattr(UX, f"UC_X86_REG_{name.upper()}"))


# The fake recorder: copies the frame (rdi) to OUT, clobbers every scratch
# register, and returns the value at OUT + 0x800 (0: recorded, 1: no room).
_RECORDER = f"""
rec:
.set OUTBUF, rec + {OUT - REC:#x}
    mov rsi, rdi
    lea rdi, [rip + OUTBUF]
    mov ecx, {8 * len(PT_REGS_NAMES)}
    rep movsb
    mov rbx, -1
    mov rbp, -1
    mov r12, -1
    mov r15, -1
    mov eax, dword ptr [rip + OUTBUF + 0x800]
    ret
"""

class DetourMachine:
    def __init__(self, window_code: bytes) -> None:
        self.guest = g = make_guest()
        for base, size in ((KTEXT, 0x2000), (AREA, 0x8000), (KSTACK & ~0xFFF, 0x1000)):
            g.map(base, size)
        g.write(KTEXT, window_code)
        g.write(KVAR, q(0x0123_4567_89AB_CDEF))
        # The callee: rax = its return address, r14 = rsp at entry; ret.
        g.write(CALLEE, bytes.fromhex("488b0424 4989e6 c3"))
        g.write(GDT + KERNEL_CS, q(0x00AF9B000000FFFF) + q(0x00CF93000000FFFF))
        g.uc.reg_write(UX.UC_X86_REG_GDTR, (0, GDT, 0x1000 - 1, 0))
        g.uc.reg_write(UX.UC_X86_REG_CS, KERNEL_CS)
        g.uc.reg_write(UX.UC_X86_REG_SS, KERNEL_SS)
        rec, _ = assemble_at(_RECORDER, REC)
        g.write(REC, rec)
        self.window = D.Window(tuple(X.decode_function(window_code, KTEXT)))
        source, _rel = D.detour_source(self.window, AREA, REC, SPILL, KERNEL_CS, KERNEL_SS)
        self.code, _ = assemble_at(source, AREA)
        assert len(self.code) == D.DETOUR_SIZE
        g.write(AREA, self.code)
        # What the host does at the doorbell of a handed-over hit, played at
        # SPILL: rip to the relocated window, then the #BP stub's return
        # (pop the registers, drop orig_rax, iretq).
        reloc = AREA + D.RELOC_OFFSET
        rip_off = 8 * PT_REGS_NAMES.index("rip")
        spill = (f"spill:\n    mov rax, {reloc:#x}\n    mov [rsp + {rip_off}], rax\n"
                 + "\n".join(f"    pop {r}" for r in PT_REGS_NAMES[:15])
                 + "\n    add rsp, 8\n    iretq\n")  # fmt: skip
        code, _ = assemble_at(spill, SPILL)
        g.write(SPILL, code)

    def run(self, spill: bool = False, eflags: int = 0x246) -> dict[str, int]:
        """Jump to the detour as the probe's jmp would, with GPRS; run to the
        end of the window. The registers there."""
        g, uc = self.guest, self.guest.uc
        g.write(OUT + 0x800, struct.pack("<I", 1 if spill else 0))
        for name, value in GPRS.items():
            uc.reg_write(_reg(name), value)
        uc.reg_write(UX.UC_X86_REG_RSP, KSTACK)
        uc.reg_write(UX.UC_X86_REG_EFLAGS, eflags)
        uc.emu_start(AREA, self.window.end, count=10_000)
        assert uc.reg_read(UX.UC_X86_REG_RIP) == self.window.end
        regs = {name: int(uc.reg_read(_reg(name))) for name in GPRS}
        regs["rsp"] = int(uc.reg_read(UX.UC_X86_REG_RSP))
        regs["eflags"] = int(uc.reg_read(UX.UC_X86_REG_EFLAGS))
        return regs

    def frame(self) -> dict[str, int]:
        raw = self.guest.read(OUT, 8 * len(PT_REGS_NAMES))
        return dict(zip(PT_REGS_NAMES, struct.unpack(f"<{len(PT_REGS_NAMES)}Q", raw),
                        strict=True))  # fmt: skip


def _riprel_then_call() -> bytes:
    """mov rax, [rip + KVAR]; call CALLEE (12 bytes: a relocated rip-relative
    load and a relocated call in one window)."""
    load = bytes.fromhex("488b05") + (KVAR - (KTEXT + 7)).to_bytes(4, "little", signed=True)
    call = b"\xe8" + (CALLEE - (KTEXT + 12)).to_bytes(4, "little", signed=True)
    return load + call


@needs_as
def test_the_detour_gives_the_recorder_the_int3_frame_and_runs_the_window() -> None:
    m = DetourMachine(_riprel_then_call())
    assert len(m.window.insns) == 2
    regs = m.run()
    frame = m.frame()
    # The frame the #BP stub would have built at an int3 at the probe.
    assert {k: frame[k] for k in GPRS} == GPRS
    assert frame["orig_rax"] == 2**64 - 1
    assert frame["rip"] == KTEXT + 1
    assert frame["rsp"] == KSTACK
    assert frame["eflags"] & 0xFFF == 0x246
    assert (frame["cs"], frame["ss"]) == (KERNEL_CS, KERNEL_SS)
    # Then the window ran as in place: the callee saw the original return
    # address (rax) on the original stack (r14), and returned past the window.
    assert regs["rax"] == KTEXT + 12
    assert regs["r14"] == KSTACK - 8
    assert regs["rsp"] == KSTACK
    # Every register the recorder clobbered is back.
    for name in ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r12", "r15"):
        assert regs[name] == GPRS[name], name
    assert regs["eflags"] & 0x200  # interrupts back on


@needs_as
def test_the_rip_relative_load_reads_the_original_address() -> None:
    load = bytes.fromhex("488b05") + (KVAR - (KTEXT + 7)).to_bytes(4, "little", signed=True)
    m = DetourMachine(load)
    regs = m.run()
    assert regs["rax"] == 0x0123_4567_89AB_CDEF
    assert regs["rsp"] == KSTACK


@needs_as
def test_a_recorder_with_no_room_hands_the_int3_frame_to_the_stub() -> None:
    """The spill path lands at the #BP stub's doorbell code with the frame at
    rsp; the host's answer (rip = the relocated window) and the stub's iretq
    then run the window with every register and the flags as at the probe."""
    m = DetourMachine(_riprel_then_call())
    regs = m.run(spill=True, eflags=0x202)
    assert regs["rax"] == KTEXT + 12
    assert regs["r14"] == KSTACK - 8
    for name in ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r12", "r15"):
        assert regs[name] == GPRS[name], name
    assert regs["rsp"] == KSTACK
    assert regs["eflags"] & 0x200


@needs_as
def test_interrupts_are_off_while_the_recorder_runs() -> None:
    m = DetourMachine(_riprel_then_call())
    seen: list[int] = []
    uc = m.guest.uc

    def at_recorder(uc_: object, address: int, size: int, data: object) -> None:
        seen.append(int(uc.reg_read(UX.UC_X86_REG_EFLAGS)))

    uc.hook_add(unicorn.UC_HOOK_CODE, at_recorder, begin=REC, end=REC)
    m.run()
    assert seen and not seen[0] & 0x200


# --- the fault stubs route a fault in a detour buffer to the host -------------------


@needs_as
@pytest.mark.parametrize(("where", "ours"), [("detour", True), ("slot", True), ("text", False)])
def test_a_fault_in_a_detour_buffer_rings_the_doorbell(where: str, ours: bool) -> None:
    """Like a fault in a slot, a fault at a relocated instruction comes to
    the host (which moves rip back to the original); one in kernel text goes
    straight to the guest's handler."""
    import dataclasses

    from qprobes.probes.stubs import VAR_ORIG, assemble_stubs
    from tests.unit.test_recorder import KSTACK as STACK
    from tests.unit.test_recorder_stubs import LAYOUT, SLOT_LO, STUB_CODE, VARS, Machine

    det_lo = LAYOUT.code + 0x90000
    layout = dataclasses.replace(LAYOUT, detour_lo=det_lo, detour_hi=det_lo + 0x10000)
    m = Machine("%di")
    m.stubs = assemble_stubs(layout)
    g, uc = m.guest, m.guest.uc
    g.write(STUB_CODE, m.stubs.code)
    guest_pf = KTEXT + 0x1800  # the guest's own #PF handler: hlt
    g.map(KTEXT, 0x2000)
    g.write(guest_pf, b"\xf4")
    g.write(VARS + VAR_ORIG + 8 * 14, q(guest_pf))
    rip = {"detour": det_lo + D.RELOC_OFFSET, "slot": SLOT_LO + 0x20, "text": KTEXT}[where]
    uc.reg_write(UX.UC_X86_REG_RSP, STACK)
    m.deliver(m.stubs["qp_pf_entry"], rip, 2, 0x246)
    stop = m.stubs["qp_fault_doorbell_ret"] if ours else guest_pf
    uc.emu_start(int(uc.reg_read(UX.UC_X86_REG_RIP)), stop, count=10_000)
    assert uc.reg_read(UX.UC_X86_REG_RIP) == stop
    if ours:
        rsp = int(uc.reg_read(UX.UC_X86_REG_RSP))
        words = struct.unpack("<23Q", g.read(rsp, 8 * 23))
        assert words[1] == 14  # the vector
        assert words[2 + PT_REGS_NAMES.index("rip")] == rip


def test_exception_table_entries_are_relative_to_their_field() -> None:
    from qprobes.linux.extable import ExceptionTable, ExtableLayout, parse_extable

    base = 0xFFFF_FFFF_8200_0000
    layout = ExtableLayout(size=12, insn=0)
    targets = [0xFFFF_FFFF_8100_2000, 0xFFFF_FFFF_8100_0010]
    data = b"".join(struct.pack("<iii", t - (base + 12 * i), 0, 0)
                    for i, t in enumerate(targets))  # fmt: skip
    insns = parse_extable(data, base, layout)
    assert insns == sorted(targets)
    table = ExceptionTable(insns)
    assert table.in_range(0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8100_0100) == [targets[1]]
    assert table.detour_check(0xFFFF_FFFF_8100_1000, 0xFFFF_FFFF_8100_1100) is None
    why = table.detour_check(0xFFFF_FFFF_8100_1F00, 0xFFFF_FFFF_8100_2100)
    assert why is not None and "exception-table" in why
