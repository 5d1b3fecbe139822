"""x86_64 instruction decoding and kprobes' out-of-line analysis.

Pure code: functions over bytes and integers. Three parts:

* :func:`decode` turns bytes into an :class:`Insn`. Capstone 5 finds the
  instruction and its length; the layout that kprobes needs (prefixes, REX,
  opcode, ModRM, where the displacement and the immediate sit) is taken from
  capstone's ``encoding`` detail and checked against the bytes themselves.
  Capstone's ``disp_size`` is wrong when a 0x66 prefix is present (it reports
  2 for ``66 c7 05 disp32 imm16``), so the displacement size is computed from
  ModRM/SIB as the Intel SDM (Vol. 2, 2.1.5, tables 2-2 and 2-3) defines it.
* :func:`analyze` says how a probed instruction may run out of line: which
  ``resume_execution`` fixup it needs, whether it modifies IF, whether it can
  be "boosted" (run from the slot with a jmp back and no single-step), or why
  it cannot be probed at all.
* :func:`copy_instruction` and :func:`boosted_copy` produce the bytes for an
  instruction slot, rewriting rip-relative displacements as
  ``__copy_instruction`` does.

Rejections (``InsnAnalysis.rejected``)
======================================

=============================  =============  ================================================
instruction                    bytes          why it cannot run from a slot
=============================  =============  ================================================
Xen/KVM forced-emulation       0f 0b 78 65 6e  the prefix and the next instruction form one
prefix                         0f 0b 6b 76 6d  unit for the hypervisor (``insn_has_emulate_prefix``
                                              in ``__copy_instruction``)
mov ss, r/m                    8e /2          the single-step trap after a load of SS is
                                              suppressed (SDM Vol. 3A 6.8.3), so the step would
                                              run past the copy (``insn_masking_exception``)
int1 / icebp                   f1             raises #DB itself, which cannot be told apart from
                                              the single-step #DB
int n                          cd ib          the guest's handler would run with a slot address
                                              as the interrupted rip (unwinder, exception
                                              tables); ``can_boost`` lists cc..ce as software
                                              exceptions
int3 with prefixes             e.g. 2e cc     cannot be stepped in place (the armed int3 replaces
                                              the prefix) nor from the slot (the #BP would report
                                              a slot address)
ud2 / ud1 / ud0                0f 0b, 0f b9,  BUG(), WARN() and UBSAN traps: the #UD handler finds
                               0f ff          the bug-table entry by rip, which fails in the slot
                                              and turns a WARN into an oops
syscall, sysret, sysenter,     0f 05, 0f 07,  change privilege level and load rip absolutely;
sysexit                        0f 34, 0f 35   Linux keeps them in entry text, which kprobes
                                              blacklists (``arch_populate_kprobe_blacklist``)
swapgs                         0f 01 f8       the GS base is the other one until the matching
                                              swapgs; a #DB/#BP there runs handlers on the wrong
                                              per-CPU base (entry text, blacklisted)
VMX instructions               0f 01 c0..c7   ``prepare_emulation``: "VM extensions - not
                                              supported"
hlt, mwait, mwaitx             f4, 0f 01 c9,  stepped with IF clear the vCPU sleeps until an NMI;
                               0f 01 fb       ``sti; hlt`` also loses sti's interrupt shadow
xbegin                         c7 f8 rel32    its abort address is rip-relative and a step
                                              inside a transaction aborts it
far indirect call / jmp        ff /3, ff /5   ``prepare_emulation`` refuses both. Without
                               (e.g. ff 1d,   REX.W the operand is m16:32 or m16:16: the call
                               66 ff 1d,      pushes a 4- or 2-byte CS and return address, which
                               48 ff 2d)      an 8-byte return-address fixup corrupts, and the
                                              target is truncated below 4 GiB; with REX.W
                                              (m16:64) Intel loads 64 bits and AMD ignores
                                              REX.W, so the result depends on the CPU
iretd, iretw                   cf, 66 cf      the 32-/16-bit frame (EIP/IP, CS, EFLAGS/FLAGS
                                              in 4-/2-byte words) truncates a kernel rip;
                                              ``prepare_emulation`` refuses every iret
0x66 on a near branch          e.g. 66 eb,    Intel ignores the prefix in 64-bit mode, AMD
                               66 ff d0       truncates rip (or the stack slot) to 16 bits: the
                                              result (and for 66 0f 8x / 66 e8 / 66 e9 even the
                                              length) depends on the CPU
=============================  =============  ================================================

Not rejected, although one might expect it: an original ``int3`` (stepped in
place, as 2.6's ``prepare_singlestep`` does; ``is_int3``), ``iretq`` (48 cf:
one 64-bit frame on every CPU, single-stepped, "rip is right"; Linux refuses
it because its int3 emulation cannot run it) and ``popf``/``cli``/``sti`` (IF
modifiers, single-stepped with the IF fixup), ``lock``/``rep`` prefixes,
``enter``, ``cpuid``, ``wrmsr``/``rdmsr``, ``in``/``out``, ``mov`` to
control/debug registers, ``lret``. Undecodable bytes raise
:class:`~qprobes.errors.InstructionError` from :func:`decode`; that covers
what is invalid in 64-bit mode: ``pop ss`` (17), ``into`` (ce), far
``jmp``/``call`` with a segment immediate (ea, 9a), ``bound``, ``salc``...
A rip-relative operand out of reach of the slot is refused at copy time
(:class:`~qprobes.errors.SlotRangeError`), as 2.6 did with ``BUG_ON``.

Boosting (``InsnAnalysis.boostable``)
=====================================

Boosted means: run the copy with the guest's own rflags (no TF, IF not
touched) and a ``jmp rel32`` back to ``addr + length``; no #DB, no fixup. That
is right exactly when running the copy gives the same result as running the
original in place. The rules mirror modern kprobes' ``can_boost``
(arch/x86/kernel/kprobes/core.c), conservative where noted:

* rejected instructions and an original int3: no.
* an instruction with an exception-table entry (a user access, ``rdmsr``
  under ``_safe``): yes, where ``can_boost`` says no. In Linux a fault in a
  boosted slot would reach the exception-table search with a slot rip; in
  qprobes the #GP/#PF stub moves rip from the slot back to the probe address
  first, so the guest's handler finds the original's entry.
* VEX/EVEX/XOP and three-byte (0f 38, 0f 3a) opcodes: no; ``can_boost`` only
  judges one- and two-byte legacy opcodes.
* two-byte opcodes: the kernel's ``twobyte_is_boostable`` table, except the
  0f 8x conditional jumps (see relocation below).
* one-byte opcodes with a 2e or 67 prefix: no (``can_boost``).
* one-byte opcodes: ``can_boost``'s switch: no for bound, loop/jrcxz,
  software interrupts, x87 escapes, lock/rep/hlt opcodes; yes otherwise,
  including ret/lret (the jmp back is dead code), pushf, popf and cli (the
  copy sees the guest's own flags).
* ``call rel32`` (e8, no prefixes other than 3e) whose return address is in
  the top 2 GiB (kernel text, modules): boostable by relocation, where
  ``can_boost`` says no and modern kprobes emulate it
  (``kprobe_emulate_call``): the copy is ``push imm32`` of the original
  return address and a ``jmp rel32`` to the target, so the callee returns
  past the probe and sees the real caller on its stack. A single-stepped
  call still runs the plain copy and has its return address fixed up.
* opcode-extension groups are decided by ModRM.reg, where ``can_boost``
  refuses Grp2..Grp4 whole and allows only ``ff /4`` of Grp5: the data
  operations boost (Grp2 shifts, Grp3 test/not/neg/mul/div, inc/dec of Grp4
  and Grp5, ``ff /6`` push, and ``ff /4``); the indirect calls (``ff /2``,
  ``ff /3``) and the far jmp (``ff /5``) do not. This matters for the
  per-CPU ``inc dword ptr gs:[rip + disp32]`` (``65 ff 05``) on hot paths.
* ``sti`` is not boostable (its interrupt shadow would cover the jmp back
  instead of the next instruction: ``sti; hlt``), nor ``iret`` (modern
  kprobes refuses in-kernel iret altogether), although ``can_boost`` allows
  both.
* relative ``jmp`` (eb, e9) and ``jcc`` (7x, 0f 8x) without prefixes other
  than 3e: boostable by relocation, an extension over the kernel (which
  emulates them instead): the copy is re-encoded with a rel32 to the original
  target (``e9 rel32``, or ``0f 8x rel32`` followed by the jmp back).
* rip-relative operands are fine: the displacement is rewritten at copy time.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import capstone
import iced_x86
from capstone import x86_const

from qprobes.errors import DecoderDisagreementError, InstructionError, SlotRangeError

__all__ = [
    "ENDBR32",
    "ENDBR64",
    "INT3",
    "JMP_REL32",
    "JMP_REL32_SIZE",
    "MAX_INSN_SIZE",
    "SLOT_SIZE",
    "Fixup",
    "Insn",
    "InsnAnalysis",
    "adjust_kprobe_offset",
    "analyze",
    "boosted_copy",
    "can_probe",
    "copy_instruction",
    "decode",
    "decode_function",
    "flags_image",
    "instruction_boundaries",
    "is_endbr",
    "skip_prefixes",
    "spanning_instruction",
    "synthesize_reljump",
]

MAX_INSN_SIZE = 15
"""The longest x86 instruction (SDM Vol. 2, 2.3.11); capstone enforces it."""

JMP_REL32 = 0xE9
JMP_REL32_SIZE = 5

SLOT_SIZE = 32
"""Bytes per instruction slot: the longest instruction plus a ``jmp rel32``
back, rounded up to a multiple of 16. Fill the unused tail with :data:`INT3`,
so that execution running past the copy traps instead of running stale bytes."""

INT3 = 0xCC
"""``BREAKPOINT_INSTRUCTION`` / ``INT3_INSN_OPCODE``."""

_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1

# Legacy prefixes (SDM Vol. 2, 2.1.1): lock/rep, segment overrides and branch
# hints, operand size, address size. The same set as 2.6's is_riprel() loop.
LEGACY_PREFIXES = frozenset({0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67})

# Linux's forced-emulation prefixes (arch/x86/include/asm/emulate_prefix.h):
# "ud2; .ascii xen" and "ud2; .ascii kvm". Linux's decoder treats the prefix
# and the instruction after it as one instruction.
_EMULATE_PREFIXES = (bytes((0x0F, 0x0B, 0x78, 0x65, 0x6E)), bytes((0x0F, 0x0B, 0x6B, 0x76, 0x6D)))

# One-byte opcodes whose operand is a relative branch displacement.
_JCC8 = range(0x70, 0x80)
_LOOP = range(0xE0, 0xE4)  # loopne, loope, loop, jrcxz
_REL_BRANCH_1 = frozenset({*_JCC8, *_LOOP, 0xE8, 0xE9, 0xEB})
_JCC32 = range(0x80, 0x90)  # second byte of 0f 8x

# Absolute memory offset forms (moffs): a0..a3 carry an 8-byte address
# (4 bytes with 0x67) and no ModRM.
_MOFFS = range(0xA0, 0xA4)


ENDBR64 = bytes((0xF3, 0x0F, 0x1E, 0xFA))
ENDBR32 = bytes((0xF3, 0x0F, 0x1E, 0xFB))


def is_endbr(code: bytes) -> bool:
    """``code`` starts with endbr64 or endbr32 (Linux's ``is_endbr``)."""
    return code[:4] in (ENDBR64, ENDBR32)


def adjust_kprobe_offset(entry: bytes, offset: int) -> tuple[int, bool]:
    """Where a probe at ``offset`` into a function goes, and whether that is
    the function's entry: Linux's ``arch_adjust_kprobe_addr``.

    ``entry`` is the function's first bytes. When it starts with an ENDBR, a
    probe at ``+0`` moves to ``+4``, past it: under IBT every indirect call
    or jmp must land on an ENDBR, and one that lands on the int3 instead
    raises #CP (control protection). ``+0`` and ``+4`` then both count as
    the entry (``kprobe_on_func_entry``, which return probes need).
    """
    if offset < 0:
        raise ValueError(f"negative offset {offset}")
    if is_endbr(entry):
        on_entry = offset in (0, 4)
        return (4 if on_entry else offset), on_entry
    return offset, offset == 0


def skip_prefixes(code: bytes) -> int:
    """Offset of the first byte after the legacy prefixes and REX of ``code``.

    Mirrors ``skip_prefixes()`` in arch/x86/kernel/kprobes/core.c (2.6's
    ``resume_execution`` skipped only REX, see :class:`Fixup`).
    """
    i = 0
    while i < len(code) and (code[i] in LEGACY_PREFIXES or 0x40 <= code[i] <= 0x4F):
        i += 1
    return i


@dataclass(frozen=True)
class Insn:
    """One decoded instruction.

    Offsets are from the first byte of the instruction; the raw bytes are
    ``raw`` (``bytes`` would shadow the type inside the class).
    """

    addr: int
    length: int
    raw: bytes
    mnemonic: str
    op_str: str
    prefixes: bytes
    """Legacy prefixes in order, plus any REX byte that a later prefix
    cancels (the CPU ignores a REX that does not immediately precede the
    opcode)."""
    rex: int | None
    """The REX byte that applies (40..4f immediately before the opcode)."""
    vex: bytes
    """The VEX (c4/c5), EVEX (62) or XOP (8f) prefix, empty for legacy encodings."""
    opcode: bytes
    """The opcode bytes: 1 to 3 for legacy encodings (0f, 0f 38, 0f 3a escapes
    included), 1 after a VEX/EVEX/XOP prefix (the map is encoded in the prefix)."""
    opcode_offset: int
    modrm: int | None
    modrm_offset: int | None
    disp_offset: int | None
    disp_size: int
    disp: int
    """The displacement as a signed integer (0 when there is none)."""
    imm_offset: int | None
    """Capstone's immediate field: for two immediates (``enter``) the last one."""
    imm_size: int
    address_size: int
    """8, or 4 with an 0x67 prefix."""
    is_riprel: bool
    """The memory operand is rip-relative: ModRM mod=00 rm=101 in 64-bit
    mode, confirmed by capstone (base register RIP/EIP)."""
    riprel_target: int | None
    """The absolute address a rip-relative operand names:
    ``addr + length + disp`` (truncated to 32 bits with an 0x67 prefix)."""
    branch_target: int | None
    """Target of a relative branch (jcc, jmp, call, loop, jrcxz, xbegin)."""
    emulate_prefix: bytes = b""
    """Linux's Xen/KVM forced-emulation prefix in front of the instruction."""

    @property
    def next_addr(self) -> int:
        """Address of the following instruction."""
        return (self.addr + self.length) & _MASK64

    @property
    def modrm_reg(self) -> int | None:
        """ModRM.reg (bits 5:3): the opcode extension of group opcodes."""
        return None if self.modrm is None else (self.modrm >> 3) & 7

    @property
    def modrm_mod(self) -> int | None:
        """ModRM.mod (bits 7:6); 3 means a register operand."""
        return None if self.modrm is None else self.modrm >> 6

    @property
    def is_relative_branch(self) -> bool:
        """The instruction's immediate is a rip-relative branch displacement."""
        return self.branch_target is not None

    def __str__(self) -> str:
        text = f"{self.mnemonic} {self.op_str}".strip()
        return f"{self.addr:#x}: {self.raw.hex(' ')}  {text}"


@functools.cache
def _capstone() -> Any:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def _signed(value: bytes) -> int:
    return int.from_bytes(value, "little", signed=True)


def _check_addr(name: str, value: int) -> None:
    if not 0 <= value <= _MASK64:
        raise ValueError(f"{name} {value:#x} is not a 64-bit address")


#: Instructions decoded so far, by their bytes: what :func:`decode` gave for
#: them at some address (relative branches and emulate prefixes left out).
_DECODED: dict[bytes, Insn] = {}
_DECODED_MAX = 1 << 15
_UD2 = b"\x0f\x0b"  # how every emulate prefix starts


def decode(code: bytes, addr: int) -> Insn:
    """Decode the instruction at the start of ``code``, located at ``addr``.

    ``code`` may be longer than the instruction (pass :data:`MAX_INSN_SIZE`
    bytes or more when the length is unknown). Raises
    :class:`~qprobes.errors.InstructionError` for bytes that are not a valid
    64-bit instruction or that end before the instruction does.

    The same bytes decode to the same instruction wherever they are, but for
    what depends on the address: the address itself, a rip-relative operand's
    target, and a relative branch's target (which capstone also prints as its
    operand: :func:`_movable`). An instruction decoded once is
    therefore taken from a cache, moved to ``addr`` (:func:`_rebased`): a
    lookup by the bytes of iced-x86's length (the length of every successful
    decode), an iced-x86 decode instead of both decoders' full work. Both
    decoders read only an instruction's own bytes, so whatever follows them
    cannot change the answer; a window starting with ``ud2`` (where an
    emulate prefix makes one instruction of two) always takes the full path.
    """
    _check_addr("address", addr)
    window = bytes(code[:MAX_INSN_SIZE])
    if window[:2] == _UD2:
        return _decode_full(code, addr)
    length = _iced_length(window, addr)
    if length is not None:
        known = _DECODED.get(window[:length])
        if known is not None:
            moved = _rebased(known, addr)
            if moved is not None:
                return moved
    insn = _decode_full(window, addr)
    if not insn.emulate_prefix and insn.length == length and _movable(insn):
        if len(_DECODED) >= _DECODED_MAX:
            _DECODED.clear()
        _DECODED[insn.raw] = insn
    return insn


def _movable(insn: Insn) -> bool:
    """Whether :func:`_rebased` can move ``insn``: no relative branch, or one
    to a kernel-half target that capstone printed as its operand in full
    (``0x%llx``, as it prints every such target: printPCRelImm)."""
    target = insn.branch_target
    return target is None or (target >> 63 == 1 and insn.op_str == f"{target:#x}")


def _iced_length(window: bytes, addr: int) -> int | None:
    instr = iced_x86.Decoder(64, window, ip=addr).decode()
    return None if instr.is_invalid else int(instr.len)


def _rebased(insn: Insn, addr: int) -> Insn | None:
    """``insn`` (see :func:`_movable`) decoded at ``addr`` instead; None for
    a branch whose target there is not in the kernel half (decoded afresh)."""
    target = insn.riprel_target
    if target is not None:
        mask = _MASK32 if insn.address_size == 4 else _MASK64
        target = (addr + insn.length + insn.disp) & mask
    branch = insn.branch_target
    op_str = insn.op_str
    if branch is not None:
        assert insn.imm_offset is not None
        branch = (addr + insn.length + _signed(insn.raw[insn.imm_offset :])) & _MASK64
        if not branch >> 63:
            return None
        op_str = f"{branch:#x}"
    # A field-for-field copy: a frozen dataclass's __init__ (what
    # dataclasses.replace runs) takes longer than the iced-x86 decode.
    moved = object.__new__(Insn)
    fields = moved.__dict__
    fields.update(insn.__dict__)
    fields["addr"] = addr
    fields["riprel_target"] = target
    fields["branch_target"] = branch
    fields["op_str"] = op_str
    return moved


def _decode_full(code: bytes, addr: int) -> Insn:
    for prefix in _EMULATE_PREFIXES:
        if code.startswith(prefix):
            try:
                inner = _decode_one(code[len(prefix) :], (addr + len(prefix)) & _MASK64)
            except DecoderDisagreementError:
                raise
            except InstructionError:
                break  # no instruction follows: a plain ud2 and data
            return _with_emulate_prefix(inner, prefix, addr)
    return _decode_one(code, addr)


def _iced_decode(window: bytes, addr: int) -> tuple[int, str] | None:
    """iced-x86's length and mnemonic for the instruction at ``window[0]``."""
    instr = iced_x86.Decoder(64, window, ip=addr).decode()
    if instr.is_invalid:
        return None
    return instr.len, _iced_mnemonics()[instr.mnemonic]


@functools.cache
def _iced_mnemonics() -> dict[int, str]:
    return {
        value: name.lower()
        for name, value in vars(iced_x86.Mnemonic).items()
        if name.isupper() and isinstance(value, int)
    }


# Capstone's instruction names that iced-x86 spells differently for the same
# instruction (AT&T-flavoured names in capstone's Intel syntax, x87 names
# with the letters in another order). Every other name must be equal. On
# every function of the default Linux guest (8.9 million instructions) the
# first four are the only naming differences; the x87 ones came out of
# random bytes.
_CAPSTONE_NAMES = {
    "movabs": "mov",
    "lcall": "call",
    "ljmp": "jmp",
    "retfq": "retf",
    "fucompi": "fucomip",
    "fcompi": "fcomip",
    "fsetpm": "fnsetpm",
    "fdisi8087_nop": "fndisi",
    "feni8087_nop": "fneni",
}

# UD0 (0f ff /r) and UD1 (0f b9 /r) take a ModRM byte (SDM Vol. 2B, "UD"),
# which capstone 5 leaves out: ``67 0f b9 40 12`` (UBSAN's trap) is 5 bytes,
# capstone says 3; the static-call trampolines' ``0f b9 cc`` is 3, capstone
# says 2. For them iced-x86's length is taken and the ModRM parsed here.
_UD_WITH_MODRM = frozenset({"ud0", "ud1"})


def _decode_one(code: bytes, addr: int) -> Insn:
    """Decode one instruction with capstone, cross-checked with iced-x86.

    Both must decode it, to the same length and the same instruction (the
    mnemonic, modulo :data:`_CAPSTONE_NAMES`): capstone 5 does not know
    ``serialize``, ``wrmsrns``, ``lkgs``, ``enqcmds``, ``tdcall``, reads
    FRED's ``erets``/``eretu`` as ``clac``, ``seamcall`` as ``encls`` and
    ``vmgexit`` as ``vmmcall`` (same length, other instruction), and
    shortens ``ud0``/``ud1``. Anything else raises
    :class:`~qprobes.errors.DecoderDisagreementError`.
    """
    window = bytes(code[:MAX_INSN_SIZE])
    try:
        ci: Any = next(_capstone().disasm(window, addr, 1), None)
    except capstone.CsError as exc:  # pragma: no cover - failures normally yield nothing
        raise InstructionError(addr, f"capstone failed: {exc}") from exc
    iced = _iced_decode(window, addr)
    if ci is None and iced is None:
        shown = window.hex(" ") or "no bytes"
        raise InstructionError(addr, f"cannot decode {shown} (invalid in 64-bit mode or truncated)")
    if iced is None:
        assert ci is not None
        raise DecoderDisagreementError(
            addr,
            f"decoders disagree on {window[: ci.size].hex(' ')}: capstone reads "
            f"{ci.mnemonic}, iced-x86 cannot decode it",
        )
    if ci is None:
        raise DecoderDisagreementError(
            addr,
            f"decoders disagree on {window[: iced[0]].hex(' ')}: iced-x86 reads "
            f"{iced[1]}, capstone cannot decode it",
        )
    iced_length, iced_name = iced
    # Capstone's instruction id (``insn_name``) or its printed mnemonic
    # without prefixes ("rep movsb"): one of them must name iced's.
    printed = (ci.mnemonic.split() or [""])[-1]
    cs_names = {_CAPSTONE_NAMES.get(n, n) for n in (ci.insn_name(), printed)}
    if iced_name not in cs_names:
        shown = window[: max(ci.size, iced_length)].hex(" ")
        raise DecoderDisagreementError(
            addr,
            f"decoders disagree on {shown}: capstone reads {ci.mnemonic} "
            f"({ci.size} bytes), iced-x86 reads {iced_name} ({iced_length} bytes)",
        )
    name = iced_name
    ud_modrm = False
    length: int = ci.size
    if iced_length != length:
        if name in _UD_WITH_MODRM and iced_length > length:
            length, ud_modrm = iced_length, True
        else:
            shown = window[: max(ci.size, iced_length)].hex(" ")
            raise DecoderDisagreementError(
                addr,
                f"decoders disagree on the length of {name} at {shown}: "
                f"capstone {ci.size} bytes, iced-x86 {iced_length}",
            )
    raw = window[:length]
    enc, cs_riprel = _cs_layout(ci)

    def disagree(what: str) -> InstructionError:
        return DecoderDisagreementError(addr, f"decoder disagreement on {raw.hex(' ')}: {what}")

    # Prefixes and REX, walked as the CPU does (SDM Vol. 2, 2.2.1: a REX
    # prefix not immediately before the opcode is ignored).
    prefixes = bytearray()
    rex: int | None = None
    i = 0
    while i < length:
        b = raw[i]
        if b in LEGACY_PREFIXES:
            if rex is not None:
                prefixes.append(rex)
                rex = None
            prefixes.append(b)
        elif 0x40 <= b <= 0x4F:
            if rex is not None:
                prefixes.append(rex)
            rex = b
        else:
            break
        i += 1
    if i >= length:
        raise disagree("no opcode after the prefixes")

    # Opcode (SDM Vol. 2, 2.1.2 and 2.3 for VEX, 2.7 for EVEX; AMD APM Vol. 3
    # 1.8 for XOP, whose 8f escape is told from "pop r/m" by map_select >= 8).
    first = raw[i]
    vex_size = {0xC5: 2, 0xC4: 3, 0x62: 4}.get(first, 0)
    if first == 0x8F and i + 1 < length and (raw[i + 1] & 0x1F) >= 8:
        vex_size = 3
    if vex_size:
        if rex is not None or 0x66 in prefixes or 0xF2 in prefixes or 0xF3 in prefixes:
            raise disagree("VEX/EVEX after REX or a 66/f2/f3 prefix")  # #UD
        vex = raw[i : i + vex_size]
        opcode = raw[i + vex_size : i + vex_size + 1]
        opcode_offset = i + vex_size
    else:
        vex = b""
        if first == 0x0F and i + 1 < length and raw[i + 1] in (0x38, 0x3A):
            opcode = raw[i : i + 3]
        elif first == 0x0F:
            opcode = raw[i : i + 2]
        else:
            opcode = raw[i : i + 1]
        opcode_offset = i
    end_of_opcode = opcode_offset + len(opcode)
    if end_of_opcode > length:
        raise disagree("opcode runs past the instruction")

    # ModRM, located by capstone (zero means none) and checked against our
    # opcode parse.
    modrm_offset: int | None = end_of_opcode if ud_modrm else enc.modrm_offset or None
    modrm: int | None = None
    if modrm_offset is not None:
        if modrm_offset != end_of_opcode or modrm_offset >= length:
            raise disagree(f"ModRM at {modrm_offset}, opcode ends at {end_of_opcode}")
        modrm = raw[modrm_offset]

    address_size = 4 if 0x67 in prefixes else 8

    # Displacement: where from capstone, how long from ModRM/SIB.
    disp_offset: int | None = enc.disp_offset or None
    if ud_modrm and modrm is not None and modrm_offset is not None:
        disp_offset = _modrm_disp_offset(raw, modrm_offset)
    disp_size = 0
    disp = 0
    if disp_offset is not None:
        if not vex and len(opcode) == 1 and opcode[0] in _MOFFS:
            disp_size = address_size
            expected_offset = end_of_opcode
        elif modrm is not None and modrm_offset is not None:
            mod, rm = modrm >> 6, modrm & 7
            has_sib = mod != 3 and rm == 4
            expected_offset = modrm_offset + 1 + (1 if has_sib else 0)
            # mod=01: disp8; mod=10: disp32; mod=00: disp32 only for rm=101
            # (rip-relative) or a SIB byte with base=101 (no base register).
            no_base = rm == 5 or (has_sib and (raw[expected_offset - 1] & 7) == 5)
            if mod == 1:
                disp_size = 1
            elif mod == 2 or (mod == 0 and no_base):
                disp_size = 4
            else:
                raise disagree(f"displacement reported with ModRM {modrm:#04x}")
        else:
            raise disagree("displacement without ModRM")
        limit = enc.imm_offset or length
        if disp_offset != expected_offset or disp_offset + disp_size > limit:
            raise disagree(f"displacement at {disp_offset}+{disp_size}, expected {expected_offset}")
        disp = _signed(raw[disp_offset : disp_offset + disp_size])

    imm_offset: int | None = None if ud_modrm else enc.imm_offset or None
    imm_size: int = enc.imm_size if imm_offset is not None else 0
    if imm_offset is not None and imm_offset + imm_size > length:
        raise disagree("immediate runs past the instruction")

    # Rip-relative: capstone's operand says base RIP (EIP with 0x67); ModRM
    # must say mod=00 rm=101 (2.6 is_riprel(): (modrm & 0xc7) == 0x05).
    # "mov cr, r" (0f 20..23) ignores mod, so the bits alone are not enough.
    if ud_modrm:
        cs_riprel = modrm is not None and (modrm & 0xC7) == 0x05
    is_riprel = disp_offset is not None and modrm is not None and (modrm & 0xC7) == 0x05
    if cs_riprel != is_riprel:
        raise disagree("rip-relative operand")
    riprel_target: int | None = None
    if is_riprel:
        if disp_size != 4:
            raise disagree("rip-relative displacement is not 32 bits")
        mask = _MASK32 if address_size == 4 else _MASK64
        riprel_target = (addr + length + disp) & mask

    # Relative branches: the immediate is the displacement and ends the
    # instruction.
    is_rel_branch = not vex and (
        (len(opcode) == 1 and opcode[0] in _REL_BRANCH_1)
        or (len(opcode) == 2 and opcode[0] == 0x0F and opcode[1] in _JCC32)
        or (opcode == b"\xc7" and modrm == 0xF8)  # xbegin
    )
    branch_target: int | None = None
    if is_rel_branch:
        if imm_offset is None or imm_offset + imm_size != length:
            raise disagree("relative branch without a trailing displacement")
        rel = _signed(raw[imm_offset:length])
        branch_target = (addr + length + rel) & _MASK64

    return Insn(
        addr=addr,
        length=length,
        raw=raw,
        mnemonic=ci.mnemonic,
        op_str=ci.op_str,
        prefixes=bytes(prefixes),
        rex=rex,
        vex=vex,
        opcode=opcode,
        opcode_offset=opcode_offset,
        modrm=modrm,
        modrm_offset=modrm_offset,
        disp_offset=disp_offset,
        disp_size=disp_size,
        disp=disp,
        imm_offset=imm_offset,
        imm_size=imm_size,
        address_size=address_size,
        is_riprel=is_riprel,
        riprel_target=riprel_target,
        branch_target=branch_target,
    )


_RIP_BASES = (x86_const.X86_REG_RIP, x86_const.X86_REG_EIP)


def _cs_layout(ci: Any) -> tuple[Any, bool]:
    """Capstone's ``encoding`` detail (modrm, disp and imm offsets and sizes)
    and whether a memory operand has base RIP or EIP, read from the C
    structure itself: the same fields as ``ci.encoding`` and ``ci.operands``,
    which first copy the whole detail into Python objects (three times the
    cost of the rest of the decode)."""
    x86 = ci._raw.detail.contents.arch.x86
    operands = x86.operands
    riprel = False
    for i in range(x86.op_count):
        op = operands[i]
        if op.type == x86_const.X86_OP_MEM and op.mem.base in _RIP_BASES:
            riprel = True
    return x86.encoding, riprel


def _modrm_disp_offset(raw: bytes, modrm_offset: int) -> int | None:
    """Where the displacement after the ModRM at ``modrm_offset`` starts, or
    None when that ModRM has none (SDM Vol. 2, tables 2-2 and 2-3)."""
    modrm = raw[modrm_offset]
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return None
    has_sib = rm == 4
    at = modrm_offset + 1 + int(has_sib)
    if mod in (1, 2):
        return at
    no_base = rm == 5 or (has_sib and at - 1 < len(raw) and (raw[at - 1] & 7) == 5)
    return at if no_base else None


def _with_emulate_prefix(inner: Insn, prefix: bytes, addr: int) -> Insn:
    n = len(prefix)

    def shift(offset: int | None) -> int | None:
        return None if offset is None else offset + n

    return Insn(
        addr=addr,
        length=inner.length + n,
        raw=prefix + inner.raw,
        mnemonic=inner.mnemonic,
        op_str=inner.op_str,
        prefixes=inner.prefixes,
        rex=inner.rex,
        vex=inner.vex,
        opcode=inner.opcode,
        opcode_offset=inner.opcode_offset + n,
        modrm=inner.modrm,
        modrm_offset=shift(inner.modrm_offset),
        disp_offset=shift(inner.disp_offset),
        disp_size=inner.disp_size,
        disp=inner.disp,
        imm_offset=shift(inner.imm_offset),
        imm_size=inner.imm_size,
        address_size=inner.address_size,
        is_riprel=inner.is_riprel,
        riprel_target=inner.riprel_target,
        branch_target=inner.branch_target,
        emulate_prefix=prefix,
    )


# --- linear decoding ------------------------------------------------------------


def _patched(code: bytes, start: int, patches: Mapping[int, bytes] | None) -> bytes:
    if not patches:
        return code
    buf = bytearray(code)
    for at, data in patches.items():
        offset = (at - start) & _MASK64
        if offset + len(data) > len(buf):
            raise ValueError(f"patch at {at:#x} lies outside {start:#x}..{start + len(buf):#x}")
        buf[offset : offset + len(data)] = data
    return bytes(buf)


def decode_function(
    code: bytes, start: int, *, patches: Mapping[int, bytes] | None = None
) -> list[Insn]:
    """Decode ``code`` (located at ``start``) linearly, instruction by instruction.

    ``patches`` maps addresses to original bytes to put back before decoding:
    the first byte under each armed probe (``__recover_probed_insn`` uses
    ``kp->opcode`` the same way). Kernel text holds no data between
    instructions (objtool checks that), so a linear sweep over a whole
    function from its symbol start finds every instruction boundary. Raises
    :class:`~qprobes.errors.InstructionError` at the first undecodable
    instruction, including one cut off by the end of ``code``.
    """
    _check_addr("start", start)
    buf = _patched(code, start, patches)
    out: list[Insn] = []
    offset = 0
    while offset < len(buf):
        insn = decode(buf[offset:], (start + offset) & _MASK64)
        out.append(insn)
        offset += insn.length
    return out


def instruction_boundaries(
    code: bytes, start: int, *, patches: Mapping[int, bytes] | None = None
) -> list[int]:
    """Start addresses of the instructions of ``code`` (see :func:`decode_function`)."""
    return [insn.addr for insn in decode_function(code, start, patches=patches)]


def can_probe(
    code: bytes, start: int, addr: int, *, patches: Mapping[int, bytes] | None = None
) -> bool:
    """Whether ``addr`` is an instruction boundary of the function at ``start``.

    Mirrors ``can_probe()`` in arch/x86/kernel/kprobes/core.c: decode from the
    symbol start up to ``addr``. ``code`` must cover ``start`` up to at least
    the end of the instruction before ``addr``. Decoding errors propagate
    (see :func:`spanning_instruction`).
    """
    _check_addr("start", start)
    _check_addr("address", addr)
    if (addr - start) & _MASK64 >= len(code):
        return False
    return spanning_instruction(code, start, addr, patches=patches) is None


def spanning_instruction(
    code: bytes, start: int, addr: int, *, patches: Mapping[int, bytes] | None = None
) -> Insn | None:
    """The instruction of the function at ``start`` that ``addr`` falls inside.

    None when ``addr`` is an instruction boundary. The walk decodes from
    ``start`` (``code`` must cover the function up to at least the end of the
    instruction before ``addr``) with the cross-checked :func:`decode`; an
    instruction that cannot be decoded with certainty on the way raises
    :class:`~qprobes.errors.InstructionError` (Linux's ``can_probe`` returns
    false when ``insn_decode_kernel`` fails): past it, no boundary is known.
    An int3 met on the way is taken as a one-byte instruction (Linux pads
    after ``ret``/``jmp`` with int3 for straight-line speculation); one that
    covers a longer instruction (another debugger's breakpoint) cannot be
    recovered and makes the answer unreliable, as in the kernel.
    """
    _check_addr("start", start)
    _check_addr("address", addr)
    target = (addr - start) & _MASK64
    buf = _patched(code, start, patches)
    offset = 0
    while offset < target:
        here = (start + offset) & _MASK64
        try:
            insn = decode(buf[offset:], here)
        except DecoderDisagreementError:
            # Only the length matters on the way: where the decoders agree on
            # it, or capstone alone cannot decode (it lacks serialize, ...),
            # iced-x86's length is the boundary. The probed instruction itself
            # still needs both to agree.
            length = _walk_length(buf[offset:], here)
            if offset + length > target:
                return decode_unchecked(buf[offset : offset + length], here)
            offset += length
            continue
        if offset + insn.length > target:
            return insn
        offset += insn.length
    return None


def _walk_length(code: bytes, addr: int) -> int:
    """An instruction's length for the boundary walk: iced-x86's, when capstone
    agrees on it or cannot decode the instruction at all."""
    window = bytes(code[:MAX_INSN_SIZE])
    iced = _iced_decode(window, addr)
    ci: Any = next(_capstone().disasm(window, addr, 1), None)
    if iced is None or (ci is not None and ci.size != iced[0]):
        raise DecoderDisagreementError(
            addr, f"the decoders disagree on the length of {window.hex(' ')}"
        )
    return iced[0]


def decode_unchecked(code: bytes, addr: int) -> Insn:
    """A bare :class:`Insn` (length and bytes only) for an instruction qprobes
    will not probe, named in an error message."""
    iced = _iced_decode(bytes(code[:MAX_INSN_SIZE]), addr)
    length = iced[0] if iced is not None else len(code)
    name = iced[1] if iced is not None else "(bad)"
    raw = bytes(code[:length])
    return Insn(addr=addr, length=length, raw=raw, mnemonic=name, op_str="", prefixes=b"",
                rex=None, vex=b"", opcode=raw[:1], opcode_offset=0, modrm=None,
                modrm_offset=None, disp_offset=None, disp_size=0, disp=0, imm_offset=None,
                imm_size=0, address_size=8, is_riprel=False, riprel_target=None,
                branch_target=None)  # fmt: skip


# --- analysis ---------------------------------------------------------------------


class Fixup(enum.Enum):
    """What ``resume_execution`` must fix after single-stepping the copy.

    The numbers are those of the comment above 2.6's ``resume_execution``
    (arch/x86_64/kernel/kprobes.c):

    0) Except for absolute or indirect jumps and calls, the new rip is
       relative to the copy and must be made relative to the original.
    1) After pushf the pushed flags show the TF and IF of the single-step.
    2) After a call the return address on the stack points after the copy.

    2.6 tested the opcode byte where it meant ModRM for 0xff (``(*insn & 0x30)
    == 0x10`` with ``*insn == 0xff``, which never holds), skipped only REX
    and not legacy prefixes, and had no ``iret`` case. Here the prefixes are
    skipped as the unified kernel's ``skip_prefixes`` does and group 5 is
    told apart by ModRM.reg.
    """

    RELATIVE = "relative"
    """Case 0 only: ``rip = orig + (rip - copy)``. Every ordinary instruction
    (rip after = copy + length) and relative jmp/jcc/loop/jrcxz."""
    PUSHF = "pushf"
    """Cases 1 and 0: pushf (9c, also 66 9c). Pushed TF/IF := the guest's own."""
    CALL_REL = "call_rel"
    """Cases 2 and 0: ``call rel32`` (e8). The copy's target is relative to the
    copy, so rip needs case 0 like any relative branch, and the return address
    is fixed: ``*tos = orig + (*tos - copy)``."""
    CALL_INDIRECT = "call_indirect"
    """Case 2 only: ``ff /2`` (near indirect call; the far ``ff /3`` is
    rejected). The target is absolute: rip is right."""
    JMP_INDIRECT = "jmp_indirect"
    """No fixup: ``ff /4`` (near indirect jmp; the far ``ff /5`` is
    rejected): rip is right."""
    RET = "ret"
    """No fixup: ret (c3), ret imm16 (c2), lret (cb, ca): rip is right."""
    IRET = "iret"
    """No fixup: iretq (48 cf; the 32-/16-bit forms are rejected): rip is
    right (the unified kernel's case 0xcf; 2.6 x86_64 lacked it and relocated
    rip wrongly)."""
    INT3 = "int3"
    """The original instruction is int3: it is stepped in place (2.6
    ``prepare_singlestep``), traps as #BP and goes on to the guest; there is
    no ``resume_execution``."""

    @property
    def rip_is_right(self) -> bool:
        """rip after the step is already the guest's next rip (no case 0)."""
        return self in (Fixup.CALL_INDIRECT, Fixup.JMP_INDIRECT, Fixup.RET, Fixup.IRET)

    @property
    def reads_tos(self) -> bool:
        """The fixup rewrites the word at the top of the stack (cases 1 and 2)."""
        return self in (Fixup.PUSHF, Fixup.CALL_REL, Fixup.CALL_INDIRECT)


@dataclass(frozen=True)
class InsnAnalysis:
    """How a probed instruction can run out of line (``arch_prepare_kprobe``)."""

    insn: Insn
    fixup: Fixup
    if_modifier: bool
    """popf (9d), cli (fa), sti (fb), iret (cf, any REX) after the prefixes:
    2.6 ``is_IF_modifier`` (the unified kernel adds the prefix skip). Then
    ``kprobe_saved_rflags`` leaves IF out, so IF after the step is the one the
    instruction produced."""
    is_int3: bool
    """The first byte is int3 (``p->opcode == BREAKPOINT_INSTRUCTION``)."""
    rejected: str | None
    """Why the instruction cannot be probed, or None (see the module table)."""
    boostable: bool
    boost_reason: str
    """Why it is, or is not, boostable."""

    @property
    def relocated_branch(self) -> bool:
        """A boosted copy re-encodes this relative jmp/jcc with a rel32."""
        return self.boostable and self.insn.is_relative_branch


def _legacy_opcode(insn: Insn) -> int | None:
    """The one-byte legacy opcode, or None for 0f-escaped or VEX encodings."""
    if insn.vex or len(insn.opcode) != 1:
        return None
    return insn.opcode[0]


def _is_if_modifier(insn: Insn) -> bool:
    # is_IF_modifier(): cli, sti, iret, popf after skip_prefixes().
    return _legacy_opcode(insn) in (0xFA, 0xFB, 0xCF, 0x9D)


def _fixup(insn: Insn) -> Fixup:
    if insn.raw[0] == INT3:
        return Fixup.INT3
    op = _legacy_opcode(insn)
    if op == 0x9C:
        return Fixup.PUSHF
    if op in (0xC2, 0xC3, 0xCA, 0xCB):
        return Fixup.RET
    if op == 0xCF:
        return Fixup.IRET
    if op == 0xE8:
        return Fixup.CALL_REL
    if op == 0xFF:
        # Group 5 is decided by ModRM.reg, not by the opcode byte as 2.6 did:
        # /2 call near, /3 call far, /4 jmp near, /5 jmp far.
        reg = insn.modrm_reg
        if reg in (2, 3):
            return Fixup.CALL_INDIRECT
        if reg in (4, 5):
            return Fixup.JMP_INDIRECT
    return Fixup.RELATIVE


def _rejection(insn: Insn) -> str | None:
    """The reason ``insn`` cannot be probed, following the module table."""
    if insn.emulate_prefix:
        return "forced-emulation prefix (Xen/KVM): prefix and instruction must stay together"
    op = _legacy_opcode(insn)
    two = insn.opcode[1] if not insn.vex and len(insn.opcode) == 2 else None
    if op == 0x8E and insn.modrm_reg == 2:
        return "mov to ss: the single-step trap after it is suppressed"
    if op == 0xF1:
        return "int1/icebp raises #DB itself"
    if op == 0xCD:
        return "int n: the handler would see a slot address as the interrupted rip"
    if op == INT3 and insn.raw[0] != INT3:
        return "int3 with prefixes can be stepped neither in place nor from a slot"
    if two in (0x0B, 0xB9, 0xFF):
        return f"{insn.mnemonic}: BUG/WARN traps are found by rip, which fails in a slot"
    if two in (0x05, 0x07, 0x34, 0x35):
        return f"{insn.mnemonic} changes privilege level (entry text is not probe-able)"
    if two == 0x01 and insn.modrm is not None:
        if insn.modrm == 0xF8:
            return "swapgs: handlers would run on the wrong GS base"
        if insn.modrm_mod == 3 and insn.modrm_reg == 0:
            return f"{insn.mnemonic}: VM extensions are not supported"
        if insn.modrm in (0xC9, 0xFB):
            return f"{insn.mnemonic} would sleep with IF clear while stepped"
    if op == 0xF4:
        return "hlt would sleep with IF clear while stepped"
    if op == 0xC7 and insn.modrm == 0xF8:
        return "xbegin: rip-relative abort address, and stepping aborts the transaction"
    if op == 0xFF and insn.modrm_reg in (3, 5):
        what = "call" if insn.modrm_reg == 3 else "jmp"
        if _rex_w(insn):
            return f"far indirect {what} (ff /{insn.modrm_reg}, m16:64): AMD ignores REX.W here"
        return (
            f"far indirect {what} (ff /{insn.modrm_reg}) with a {_operand_bits(insn)}-bit "
            "operand: its CS and return address are not 8-byte words"
        )
    if op == 0xCF and not _rex_w(insn):
        return f"{_operand_bits(insn)}-bit iret: its frame cannot hold a kernel rip"
    if 0x66 in insn.prefixes and _is_near_branch(insn):
        return "operand-size prefix on a near branch: Intel and AMD disagree on its effect"
    return None


def _rex_w(insn: Insn) -> bool:
    return insn.rex is not None and bool(insn.rex & 0x08)


def _operand_bits(insn: Insn) -> int:
    """The operand size of a legacy instruction whose default is 32 bits."""
    if _rex_w(insn):
        return 64
    return 16 if 0x66 in insn.prefixes else 32


def flags_image(insn: Insn) -> tuple[int, int] | None:
    """Where the rflags image that ``insn`` loads sits: (offset from rsp, size).

    popf loads TF from the word at the top of the stack (``popfq`` 8 bytes,
    ``66 9d`` 2), iret from the frame's third word (``iretq`` at rsp + 16,
    8 bytes; ``iretd`` at + 8, 4 bytes; ``66 cf`` at + 4, 2 bytes). None for
    any other instruction. The single-step then sees the TF the guest itself
    asked for.
    """
    op = _legacy_opcode(insn)
    if op == 0x9D:  # popf: 64-bit by default in 64-bit mode
        size = 2 if 0x66 in insn.prefixes and not _rex_w(insn) else 8
        return 0, size
    if op == 0xCF:
        size = _operand_bits(insn) // 8
        return 2 * size, size
    return None


def _is_near_branch(insn: Insn) -> bool:
    if insn.is_relative_branch:
        return True
    op = _legacy_opcode(insn)
    return op in (0xC2, 0xC3) or (op == 0xFF and insn.modrm_reg in (2, 4))


def _bitmap(*rows: str) -> frozenset[int]:
    return frozenset(
        row * 16 + col
        for row, bits in enumerate(rows)
        for col, bit in enumerate(bits)
        if bit == "1"
    )


# twobyte_is_boostable[] from arch/x86/kernel/kprobes/core.c: "Undefined/
# reserved opcodes, conditional jump, Opcode Extension Groups, and some
# special opcodes can not boost." Row r, column c is opcode 0f (r*16 + c).
_TWOBYTE_IS_BOOSTABLE = _bitmap(
    # 0123456789abcdef
    "0011001011000000",  # 0f 00
    "0000000000000001",  # 0f 10
    "1111000000000000",  # 0f 20
    "0100000000000000",  # 0f 30
    "1111111111111111",  # 0f 40
    "0000000000000000",  # 0f 50
    "1111111111110011",  # 0f 60
    "0000111100000011",  # 0f 70
    "0000000000000000",  # 0f 80
    "1111111111111111",  # 0f 90
    "1101110011011101",  # 0f a0
    "1111111100011111",  # 0f b0
    "1100000011111111",  # 0f c0
    "0111010011011101",  # 0f d0
    "0110010011011101",  # 0f e0
    "0111010011101110",  # 0f f0
)

# One-byte opcodes can_boost() refuses, with its comments.
_ONEBYTE_NOT_BOOSTABLE: dict[int, str] = {
    0x62: "bound",
    **{op: "loop/jrcxz (rel8 cannot be relocated)" for op in _LOOP},
    0x9A: "call far",
    0xCC: "software exception",
    0xCD: "software exception",
    0xCE: "software exception",
    0xD6: "(UD)",
    **{op: "x87 escape" for op in range(0xD8, 0xE0)},
    0xE8: "call rel32 with prefixes is not relocated",
    0xF0: "LOCK/REP, HLT",
    0xF1: "LOCK/REP, HLT",
    0xF2: "LOCK/REP, HLT",
    0xF3: "LOCK/REP, HLT",
    0xF4: "LOCK/REP, HLT",
}

# Opcode-extension groups, decided by ModRM.reg where can_boost() refuses
# the whole group (its table works per opcode byte): the data operations
# boost; Grp5's calls and far jmp do not.
_GROUPS_BOOSTABLE_REG: dict[int, tuple[str, frozenset[int]]] = {
    0xC0: ("Grp2 (shift/rotate)", frozenset(range(8))),
    0xC1: ("Grp2 (shift/rotate)", frozenset(range(8))),
    0xD0: ("Grp2 (shift/rotate)", frozenset(range(8))),
    0xD1: ("Grp2 (shift/rotate)", frozenset(range(8))),
    0xD2: ("Grp2 (shift/rotate)", frozenset(range(8))),
    0xD3: ("Grp2 (shift/rotate)", frozenset(range(8))),
    0xF6: ("Grp3 (test/not/neg/mul/div)", frozenset(range(8))),
    0xF7: ("Grp3 (test/not/neg/mul/div)", frozenset(range(8))),
    0xFE: ("Grp4 (inc/dec)", frozenset({0, 1})),
    0xFF: ("Grp5 (inc/dec/jmp near/push)", frozenset({0, 1, 4, 6})),
}


def _can_boost(insn: Insn) -> tuple[bool, str]:
    """can_boost() from arch/x86/kernel/kprobes/core.c, with the changes the
    module docstring lists."""
    if insn.raw[0] == INT3:
        return False, "int3 is stepped in place"
    if insn.vex:
        return False, "VEX/EVEX/XOP encoding (can_boost judges legacy opcodes only)"
    op = insn.opcode
    if insn.is_relative_branch and (op[0] in _JCC8 or op[0] in (0xE9, 0xEB) or op[0] == 0x0F):
        if insn.rex is not None or any(p != 0x3E for p in insn.prefixes):
            return False, "relative jmp/jcc with prefixes is not relocated"
        return True, "relative jmp/jcc: relocated to a rel32 to the original target"
    if op == b"\xe8" and insn.is_relative_branch:
        if insn.rex is not None or any(p != 0x3E for p in insn.prefixes):
            return False, "call rel32 with prefixes is not relocated"
        if insn.next_addr < _PUSH_IMM32_LOW:
            return False, ("call rel32: its return address does not fit a sign-extended "
                           "push imm32")  # fmt: skip
        return True, ("call rel32: relocated to a push of the original return address "
                      "and a jmp to the target")  # fmt: skip
    if len(op) == 2:
        if op[1] in _TWOBYTE_IS_BOOSTABLE:
            return True, f"two-byte opcode 0f {op[1]:02x} is boostable"
        return False, f"two-byte opcode 0f {op[1]:02x} is not boostable (twobyte_is_boostable)"
    if len(op) != 1:
        return False, "three-byte opcode map (can_boost judges one- and two-byte opcodes)"
    if 0x2E in insn.prefixes or 0x67 in insn.prefixes:
        return False, "CS-override or address-size prefix"
    first = op[0]
    if first in _ONEBYTE_NOT_BOOSTABLE:
        return False, f"{_ONEBYTE_NOT_BOOSTABLE[first]} is not boostable"
    if first in _GROUPS_BOOSTABLE_REG:
        name, regs = _GROUPS_BOOSTABLE_REG[first]
        reg = insn.modrm_reg
        if reg in regs:
            return True, f"{first:02x} /{reg}: {name} runs unchanged from the slot"
        if first == 0xFF and reg in (2, 3):
            return False, "indirect call: the return address would point into the slot"
        return False, f"{first:02x} /{reg} of {name} is not boostable"
    if first == 0xFB:
        return False, "sti: its interrupt shadow would cover the jmp back"
    if first == 0xCF:
        return False, "iret is not boosted (modern kprobes refuses in-kernel iret)"
    if first in (0xC2, 0xC3, 0xCA, 0xCB):
        return True, "ret lands on its own target; the jmp back is dead code"
    return True, f"one-byte opcode {first:02x} runs unchanged from the slot"


def analyze(insn: Insn) -> InsnAnalysis:
    """Analyse ``insn`` for probing (``arch_prepare_kprobe``/``arch_copy_kprobe``)."""
    rejected = _rejection(insn)
    if rejected is not None:
        boostable, reason = False, f"rejected: {rejected}"
    else:
        boostable, reason = _can_boost(insn)
    return InsnAnalysis(
        insn=insn,
        fixup=_fixup(insn),
        if_modifier=_is_if_modifier(insn),
        is_int3=insn.raw[0] == INT3,
        rejected=rejected,
        boostable=boostable,
        boost_reason=reason,
    )


# --- slot contents -------------------------------------------------------------


def _rel32(insn_addr: int, slot_addr: int, origin: int, target: int, what: str) -> int:
    """``target - origin`` as a signed 32-bit value, or SlotRangeError.

    The arithmetic is modulo 2**64, as the CPU's: a slot at the top of the
    address space reaches targets just above zero and the other way round.
    """
    delta = target - origin
    if delta >= 1 << 63:
        delta -= 1 << 64
    elif delta < -(1 << 63):
        delta += 1 << 64
    if not -(1 << 31) <= delta < 1 << 31:
        raise SlotRangeError(insn_addr, slot_addr, target, what)
    return delta


def synthesize_reljump(from_addr: int, to_addr: int) -> bytes:
    """A ``jmp rel32`` placed at ``from_addr`` that jumps to ``to_addr``.

    Mirrors ``synthesize_reljump()``; raises
    :class:`~qprobes.errors.SlotRangeError` when the distance does not fit.
    """
    _check_addr("jump source", from_addr)
    _check_addr("jump target", to_addr)
    return _reljump(from_addr, from_addr, from_addr, to_addr)


def _reljump(insn_addr: int, slot_addr: int, from_addr: int, to_addr: int) -> bytes:
    rel = _rel32(insn_addr, slot_addr, from_addr + JMP_REL32_SIZE, to_addr, "jmp target")
    return bytes((JMP_REL32,)) + rel.to_bytes(4, "little", signed=True)


def copy_instruction(insn: Insn, slot_addr: int) -> bytes:
    """The bytes of ``insn`` to run at ``slot_addr`` under single-step.

    Mirrors ``__copy_instruction()``: a rip-relative displacement is rewritten
    so that the copy names the same address
    (``new_disp = target - (slot_addr + length)``); a result outside signed
    32 bits raises :class:`~qprobes.errors.SlotRangeError` (2.6 had
    ``BUG_ON``). With an 0x67 prefix the address is computed modulo 2**32 and
    always fits. Relative branches are not rewritten: ``resume_execution``
    relocates rip after the step (:attr:`Fixup.RELATIVE`). A rejected
    instruction raises :class:`~qprobes.errors.InstructionError`.
    """
    _check_addr("slot address", slot_addr)
    rejected = _rejection(insn)
    if rejected is not None:
        raise InstructionError(insn.addr, rejected)
    if not insn.is_riprel:
        return insn.raw
    assert insn.disp_offset is not None and insn.riprel_target is not None
    origin = slot_addr + insn.length
    if insn.address_size == 4:
        new_disp = (insn.riprel_target - origin) & _MASK32
        encoded = new_disp.to_bytes(4, "little")
    else:
        new_disp = _rel32(insn.addr, slot_addr, origin, insn.riprel_target, "rip-relative operand")
        encoded = new_disp.to_bytes(4, "little", signed=True)
    at = insn.disp_offset
    return insn.raw[:at] + encoded + insn.raw[at + 4 :]


#: The lowest address a ``push imm32`` (sign-extended) can push: the top 2
#: GiB, where x86-64 kernel text and modules live.
_PUSH_IMM32_LOW = 0xFFFF_FFFF_8000_0000


def boosted_copy(insn: Insn, slot_addr: int, analysis: InsnAnalysis | None = None) -> bytes:
    """The bytes to run ``insn`` at ``slot_addr`` without single-stepping.

    Mirrors ``prepare_boost()``: the copy (:func:`copy_instruction`) followed
    by a ``jmp rel32`` to ``insn.addr + insn.length``. A relative jmp becomes
    ``e9 rel32`` to its original target; a jcc becomes ``0f 8x rel32`` to its
    original target followed by the jmp back. Raises
    :class:`~qprobes.errors.InstructionError` when the instruction is rejected
    or not boostable, :class:`~qprobes.errors.SlotRangeError` when the slot is
    out of rel32 reach. ``analysis``: ``analyze(insn)``, when the caller has it.
    """
    if analysis is None or analysis.insn is not insn:
        analysis = analyze(insn)
    if analysis.rejected is not None:
        raise InstructionError(insn.addr, analysis.rejected)
    if not analysis.boostable:
        raise InstructionError(insn.addr, f"not boostable: {analysis.boost_reason}")
    _check_addr("slot address", slot_addr)
    if analysis.relocated_branch:
        assert insn.branch_target is not None
        op = insn.opcode
        if op[0] == 0xE8:
            # What the call does: its return address on the stack (the
            # original's, so the callee returns past the probe and an
            # unwinder sees the real caller), then the jump to the callee.
            push = bytes((0x68,)) + insn.next_addr.to_bytes(8, "little")[:4]
            return push + _reljump(insn.addr, slot_addr, slot_addr + len(push),
                                   insn.branch_target)  # fmt: skip
        if op[0] in (0xE9, 0xEB):
            return _reljump(insn.addr, slot_addr, slot_addr, insn.branch_target)
        cc = op[1] & 0x0F if op[0] == 0x0F else op[0] & 0x0F
        rel = _rel32(insn.addr, slot_addr, slot_addr + 6, insn.branch_target, "jcc target")
        body = bytes((0x0F, 0x80 | cc)) + rel.to_bytes(4, "little", signed=True)
    else:
        body = copy_instruction(insn, slot_addr)
    back = _reljump(insn.addr, slot_addr, slot_addr + len(body), insn.next_addr)
    return body + back


_NEAR_BRANCH_KINDS = frozenset({iced_x86.OpKind.NEAR_BRANCH16, iced_x86.OpKind.NEAR_BRANCH32,
                                iced_x86.OpKind.NEAR_BRANCH64})  # fmt: skip


#: The one-byte opcodes of branches with an 8-bit displacement: jcc, loopne,
#: loope, loop, jrcxz, jmp.
_REL8_OPCODES = frozenset([*range(0x70, 0x80), 0xE0, 0xE1, 0xE2, 0xE3, 0xEB])
#: ``xbegin rel16`` (operand-size prefix): its target is not truncated.
_XBEGIN16 = b"\x66\xc7\xf8"
#: ``(-k) & 0xff`` for k up to 64 KiB + 256: every descending byte sequence.
_DESCENDING = bytes((-k) & 0xFF for k in range((1 << 16) + 256))


def _low_byte_matches(code: bytes, c: int, lo: int, hi: int) -> list[int]:
    """The offsets ``i`` in ``[lo, hi)`` where ``code[i] == (c - i) & 0xff``
    (a field at ``i`` whose value falls by one per byte: a displacement to a
    fixed target): one XOR of the bytes with a descending sequence."""
    if lo >= hi:
        return []
    seg = code[lo:hi]
    k = 256 - (c & 0xFF) + lo
    pat = _DESCENDING[k : k + hi - lo]
    diff = (int.from_bytes(seg, "little") ^ int.from_bytes(pat, "little")).to_bytes(
        hi - lo, "little"
    )
    out: list[int] = []
    at = diff.find(0)
    while at >= 0:
        out.append(lo + at)
        at = diff.find(0, at + 1)
    return out


def _may_branch_to(code: bytes, start: int, target: int) -> bool:
    """False only when no relative branch in ``code`` (at ``start``), on any
    instruction boundaries, can go to ``target``: a branch's displacement is
    its last field, right after the opcode, so one whose field starts at
    offset ``i`` holds ``target - (start + i + width)``. A byte scan with no
    decoding: the fields' low bytes are found all at once (they fall by one
    per offset), and only the few offsets that match are looked at.
    (jmp and jcc rel16 truncate rip to 16 bits: never a kernel address;
    xbegin rel16 does not, and any ``66 c7 f8`` answers True.)"""
    n = len(code)
    if n >= 1 << 16 or _XBEGIN16 in code:
        return True  # (xbegin rel16 does not truncate rip: not scanned for)
    # rel8 (jcc, jmp, loop*, jrcxz): the field at i holds target - (start +
    # i + 1), in -128 .. 127.
    base8 = target - start - 1
    for i in _low_byte_matches(code, base8, max(1, base8 - 127), min(n, base8 + 129)):
        if code[i - 1] in _REL8_OPCODES:
            return True
    # rel32 (call, jmp, jcc, xbegin): the field at i holds target - (start + i + 4).
    base32 = target - start - 4
    if base32 < -(1 << 31) or base32 - (n - 4) >= 1 << 31:
        return False  # out of reach of every rel32 field here
    for i in _low_byte_matches(code, base32, 1, n - 3):
        if (int.from_bytes(code[i : i + 4], "little", signed=True) == base32 - i
                and (code[i - 1] in (0xE8, 0xE9)
                     or (i >= 2 and code[i - 2] == 0x0F and 0x80 <= code[i - 1] <= 0x8F)
                     or (i >= 2 and code[i - 2] == 0xC7 and code[i - 1] == 0xF8))):  # fmt: skip
            return True
    return False


def quick_branches_to(code: bytes, start: int, target: int) -> list[int] | None:
    """The relative branches in ``code`` (a function at ``start``) that go to
    ``target``, found by one linear sweep of iced-x86 with no per-instruction
    analysis; None when the sweep cannot decide (an instruction iced-x86
    cannot decode, or an emulate prefix, which :func:`decode` reads as part
    of the instruction after it): then decode the function in full, which
    also raises where the decoders disagree. Where :func:`decode_function`
    succeeds its boundaries are iced-x86's lengths (it requires capstone's
    to agree, or takes iced-x86's for ud0/ud1), so the branch targets are
    the same."""
    _check_addr("start", start)
    if not _may_branch_to(code, start, target):
        return []
    if any(prefix in code for prefix in _EMULATE_PREFIXES):
        return None
    out: list[int] = []
    end = start + len(code)
    for instr in iced_x86.Decoder(64, code, ip=start):
        if instr.is_invalid or instr.next_ip > end:
            return None
        if instr.op0_kind in _NEAR_BRANCH_KINDS and instr.near_branch_target == target:
            out.append(instr.ip)
    return out
