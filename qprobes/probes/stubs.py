"""The guest-side trap stubs, assembled for the area's address.

qprobes points IDT vectors 1 (#DB) and 3 (#BP), and the faults an instruction
in a slot can raise (:data:`SLOT_FAULT_VECTORS`: #DE, #UD, #NM, #TS, #NP,
#SS, #GP, #PF, #MF, #AC, #XM), at these stubs. Each stub saves the
interrupted registers in Linux's ``pt_regs`` layout (so the host reads and
edits them in one memory access), decides whether the exception is qprobes'
own, and if it is, stores to a *doorbell* byte that the host watches with a
write watchpoint (Z2). A watchpoint stop does not flush QEMU's translation
cache, where a breakpoint stop does (FIELD-NOTES, "The cost that decides the
design").

At the doorbell the stack holds, from ``rsp`` upward::

    action   0 until the host answers; 1 = return (iretq), 2 = pass the
             exception on to the guest's own handler
    vector   1, 3, a slot fault vector; or KRETPROBE_VECTOR / JPROBE_VECTOR
    pt_regs  r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi
             orig_rax (error code, or -1; for #DB the DR6 the stub read,
             which it loads back into DR6 before passing the #DB on)
             rip cs rflags rsp ss

If the host never saw a doorbell store (in all-stop mode two vCPUs can ring
at once and QEMU reports one), ``action`` stays 0 and the stub rings again.

Exceptions that are not qprobes' go straight to the guest's handler with no
stop: a user-mode int3; an int3 whose address is not in the probe table
(an int3 whose byte qprobes already removed resumes at its address, as
Linux's ``kprobe_int3_handler`` does); a #DB while no vCPU single-steps a
slot and whose rip is outside the slot pages; a fault whose rip is outside the
slot pages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PT_REGS_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
)  # fmt: skip
FRAME_WORDS = 2 + len(PT_REGS_NAMES)  # action, vector, pt_regs
FRAME_SIZE = 8 * FRAME_WORDS

ACTION_NONE = 0
ACTION_RETURN = 1
ACTION_CHAIN = 2

KRETPROBE_VECTOR = 0x100
JPROBE_VECTOR = 0x101

PTABLE_BITS = 13
PTABLE_ENTRIES = 1 << PTABLE_BITS
PTABLE_MAX_LOAD = PTABLE_ENTRIES // 2
HASH_MULT = 0x9E3779B97F4A7C15

DR6_RESET = 0xFFFF0FF0

# Faults an instruction running in a slot can raise, and whether the CPU
# pushes an error code for them (SDM Vol. 3A, table 6-1). #DB and #BP have
# stubs of their own; #DF, NMI and #MC are never redirected.
SLOT_FAULT_VECTORS: dict[int, bool] = {
    0: False,  # #DE: div, idiv
    6: False,  # #UD
    7: False,  # #NM
    10: True,  # #TS: iret, lret
    11: True,  # #NP: segment loads, iret, lret
    12: True,  # #SS
    13: True,  # #GP
    14: True,  # #PF
    16: False,  # #MF: x87
    17: True,  # #AC
    19: False,  # #XM: SSE
}


# The faults a recorder's load can raise: #GP (a non-canonical address) and #PF.
RECORDER_FAULT_VECTORS = frozenset({13, 14})
RTABLE_BOOST_SHIFT = 32
EFLAGS_TF = 0x100


def rtable_entry(recorder_offset: int, boost_offset: int) -> int:
    """The fast-path table word of a probe: area offsets of its recorder and
    of its boosted slot entry."""
    return recorder_offset | boost_offset << RTABLE_BOOST_SHIFT


def probe_hash(addr: int) -> int:
    """The probe-table bucket of ``addr``; the #BP stub computes the same."""
    return ((addr * HASH_MULT) & (2**64 - 1)) >> (64 - PTABLE_BITS)


@dataclass(frozen=True)
class StubLayout:
    """Addresses the stubs are assembled against."""

    code: int  # the code page
    doorbell: int
    vars: int  # orig handlers and flags, see VAR_* offsets
    ptable: int  # PTABLE_ENTRIES u64 probe addresses, 0 = empty
    slot_lo: int  # [slot_lo, slot_hi) holds the instruction slots
    slot_hi: int
    # The fast path (0: none). ``rtable``: one u64 per probe-table entry,
    # the area offsets (from ``code``) of the probe's recorder (low half) and
    # of its boosted slot entry (high half), 0 = no recorder. [rec_lo,
    # rec_hi) holds the recorders; ``extable``: their (load rip, fixup rip)
    # u64 pairs, ended by a zero load rip.
    rtable: int = 0
    rec_lo: int = 0
    rec_hi: int = 0
    extable: int = 0
    # More slot pages, in the regions after the area's first 2 MiB (0: none).
    slot2_lo: int = 0
    slot2_hi: int = 0
    # The per-CPU offset of the guest kernel's CPU number (None: cpuid).
    cpu_number: int | None = None
    # [detour_lo, detour_hi): the detour buffers (0: none), where a fault
    # is qprobes' as in a slot.
    detour_lo: int = 0
    detour_hi: int = 0


# Offsets inside the vars page.
VAR_ORIG = 0x00  # u64 orig handler per vector, indexed by vector (0..31)
VAR_SS_ACTIVE = 0x100  # u64: vCPUs currently single-stepping a slot
# Per-CPU records, indexed by initial APIC ID: the frame address, GS base,
# CR3 and TSC at the last doorbell, so the host needs no register packet per
# hit (and knows when, on the guest's own clock, the hit happened).
VAR_PERCPU = 0x200
PERCPU_STRIDE = 32
MAX_CPUS = 64
# The probe table in use: a pointer to its header (below), switched with one
# 8-byte store (qprobes.probes.ptable). The first table's header lives here.
VAR_PTABLE = 0xF00
VAR_PTABLE_HEADER = 0xF20
# A table header: shift (64 - log2 buckets), mask, the probe addresses, the
# fast-path words (one per bucket; 0: none).
HEADER_SHIFT, HEADER_MASK, HEADER_ADDRS, HEADER_RTABLE = 0, 8, 16, 24
HEADER_SIZE = 32
RECORD_FRAME, RECORD_GS_BASE, RECORD_CR3, RECORD_TSC = 0, 8, 16, 24

def _record(label: str, cpu_number: int | None = None) -> str:
    """Store rsp (the frame), the GS base, CR3 and the TSC in this CPU's
    record. Clobbers rax, rbx, rcx, rdx, which the frame already holds.

    The CPU: with ``cpu_number`` (the per-CPU offset of the guest kernel's
    own CPU number, Linux's ``cpu_number``) it is read at GS base +
    ``cpu_number`` when the GS base is a kernel address (bit 63: the
    kernel's per-CPU base is loaded, which is so for every exception from
    kernel code outside the entry code's swapgs window, where no probe is
    allowed); otherwise, and without the offset, the initial APIC ID from
    ``cpuid`` (which exits to the hypervisor under KVM).
    """
    if cpu_number is None:
        cpu = """
    mov eax, 1
    cpuid
    shr ebx, 24
"""
    else:
        cpu = f"""
    bt rax, 63
    jnc {label}_cpuid
    mov ebx, dword ptr [rax + {cpu_number:#x}]
    jmp {label}_cpu
{label}_cpuid:
    mov eax, 1
    cpuid
    shr ebx, 24
{label}_cpu:
"""
    return f"""
    mov ecx, 0xc0000101
    rdmsr
    shl rdx, 32
    or rax, rdx
    push rax
{cpu}
    pop rax
    and ebx, {MAX_CPUS - 1}
    shl ebx, 5
    lea rcx, [rip + VARS + {VAR_PERCPU:#x}]
    add rbx, rcx
    mov [rbx + 8], rax
    lea rax, [rsp]
    mov [rbx], rax
    mov rax, cr3
    mov [rbx + 16], rax
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov [rbx + 24], rax
"""


_SAVE = "\n".join(f"    push {r}" for r in reversed(PT_REGS_NAMES[:15]))
_RESTORE = "\n".join(f"    pop {r}" for r in PT_REGS_NAMES[:15])

# Offsets from rsp after SAVE (pt_regs at rsp).
_RIP = 8 * PT_REGS_NAMES.index("rip")
_ORIG_RAX = 8 * PT_REGS_NAMES.index("orig_rax")
_CS = 8 * PT_REGS_NAMES.index("cs")
_EFLAGS = 8 * PT_REGS_NAMES.index("eflags")


def _ring(vector: int, label: str, error_code: bool, debug: bool = False,
          cpu_number: int | None = None) -> str:
    """Ring the doorbell, then return or chain to the guest's handler.

    ``debug`` (#DB): returning resets DR6; chaining loads DR6 from the
    frame's orig_rax word, where the host may have cleared the bits that
    were qprobes' own (BS of its single-step).
    """
    drop = "" if error_code else "    add rsp, 8"
    dr6 = f"    mov rax, {DR6_RESET:#x}\n    mov dr6, rax" if debug else ""
    dr6_chain = f"    mov rax, [rsp + {_ORIG_RAX}]\n    mov dr6, rax" if debug else ""
    return f"""
{label}_ours:
    push {vector:#x}
    push 0
{_record(label, cpu_number)}
{label}_ring:
    mov byte ptr [rip + DOORBELL], 1
.globl {label}_doorbell_ret
{label}_doorbell_ret:
    mov rax, [rsp]
    test rax, rax
    jz {label}_ring
    add rsp, 16
    cmp rax, {ACTION_CHAIN}
    je {label}_chain
{dr6}
{_RESTORE}
    add rsp, 8
    iretq
{label}_chain:
{dr6_chain}
{_RESTORE}
{drop}
    jmp qword ptr [rip + VARS + {VAR_ORIG + 8 * vector:#x}]
"""


def _fast_hit() -> str:
    """A probe with a recorder: record in the guest and go to the boosted
    slot, with no doorbell. A recorder that found no room (lossless mode)
    returns nonzero: the hit rings the doorbell as a slow-path one. The
    host's flow is kept (a doorbell) while some vCPU single-steps a slot,
    and when the guest single-steps itself (TF): that hit must trap after
    the original instruction, not after the copy.
    Entered with rdx = the probe-table index, rsi = the table's header."""
    return f"""
qp_bp_found:
    mov rcx, [rsi + {HEADER_RTABLE}]
    test rcx, rcx
    jz qp_bp_ours
    mov rdx, [rcx + rdx * 8]
.globl qp_bp_table_done
qp_bp_table_done:
    test rdx, rdx
    jz qp_bp_ours
    cmp qword ptr [rip + VARS + {VAR_SS_ACTIVE:#x}], 0
    jne qp_bp_ours
    test qword ptr [rsp + {_EFLAGS}], {EFLAGS_TF:#x}
    jnz qp_bp_ours
    lea rax, [rip + qp_base]
    mov ecx, edx
    add rax, rcx
    mov rdi, rsp
    push rdx
.globl qp_bp_record
qp_bp_record:
    call rax
    pop rdx
    test eax, eax
    jnz qp_bp_ours
    lea rax, [rip + qp_base]
    shr rdx, {RTABLE_BOOST_SHIFT}
    add rdx, rax
    mov [rsp + {_RIP}], rdx
{_RESTORE}
    add rsp, 8
    iretq
"""


def _in_slots(label: str, more: bool = False, detours: bool = False) -> str:
    """Jump to ``{label}_ours`` if the frame's rip is in the slot pages (with
    ``more``, those of the later regions too; with ``detours``, in the detour
    buffers), else to ``{label}_chain``. Clobbers rax, rcx."""
    ranges = [("SLOT_LO", "SLOT_HI", f"{label}_slots1")]
    if more:
        ranges.append(("SLOT2_LO", "SLOT2_HI", f"{label}_slots2"))
    if detours:
        ranges.append(("DETOUR_LO", "DETOUR_HI", f"{label}_detours"))
    out = ["    mov rax, [rsp + " + str(_RIP) + "]"]
    for i, (lo, hi, name) in enumerate(ranges):
        miss = ranges[i + 1][2] if i + 1 < len(ranges) else f"{label}_chain"
        out.append(f"""{name}:
    lea rcx, [rip + {lo}]
    cmp rax, rcx
    jb {miss}
    lea rcx, [rip + {hi}]
    cmp rax, rcx
    jae {miss}
    jmp {label}_ours""")
    return "\n" + "\n".join(out) + "\n"


def fault_label(vector: int) -> str:
    """The label prefix of the stub for a slot fault vector."""
    return {13: "qp_gp", 14: "qp_pf"}.get(vector, f"qp_fault{vector}")


def _recorder_fixup(label: str) -> str:
    """A #PF or #GP at a recorder's load: resume at the load's fixup (the
    recorder's exception table, like Linux's ``fixup_exception``), with no
    stop and without the guest's handler. Falls through when rip is not a
    listed load. Clobbers rax, rcx, rdx."""
    return f"""
    mov rax, [rsp + {_RIP}]
    lea rcx, [rip + REC_LO]
    cmp rax, rcx
    jb {label}_notrec
    lea rcx, [rip + REC_HI]
    cmp rax, rcx
    jae {label}_notrec
    lea rcx, [rip + EXTABLE]
{label}_ext:
    mov rdx, [rcx]
    test rdx, rdx
    jz {label}_notrec
    cmp rdx, rax
    je {label}_fixup
    add rcx, 16
    jmp {label}_ext
{label}_fixup:
    mov rdx, [rcx + 8]
    mov [rsp + {_RIP}], rdx
{_RESTORE}
    add rsp, 8
    iretq
{label}_notrec:
"""


def _slot_fault(vector: int, error_code: bool, fast: bool = False, more: bool = False,
                detours: bool = False) -> str:  # fmt: skip
    """A fault stub: ours when rip is in a slot (with ``more``, also those of
    the later regions) or, with ``detours``, in a detour buffer (a relocated
    instruction faulted: the host moves rip back to the original), then the
    shared doorbell of ``qp_fault_ours``; else straight to the guest's
    handler. With ``fast``, a fault at a recorder's load goes to its fixup
    first."""
    label = fault_label(vector)
    push = "" if error_code else "    push -1"
    drop = "" if error_code else "    add rsp, 8"
    fixup = _recorder_fixup(label) if fast and vector in RECORDER_FAULT_VECTORS else ""
    return f"""
.globl {label}_entry
{label}_entry:
{push}
{_SAVE}
{fixup}
{_in_slots(label, more, detours)}
{label}_ours:
    push {vector:#x}
    jmp qp_fault_ours
{label}_chain:
{_RESTORE}
{drop}
    jmp qword ptr [rip + VARS + {VAR_ORIG + 8 * vector:#x}]
"""


def _fault_doorbell(cpu_number: int | None = None) -> str:
    """The doorbell shared by the slot fault stubs (the vector is pushed).

    Returning pops orig_rax whichever it holds (an error code, or the -1 the
    stub pushed); passing the fault on goes through the vector's own chain
    code, which knows whether to drop that word.
    """
    *rest, last = SLOT_FAULT_VECTORS
    dispatch = "\n".join(f"    cmp rcx, {v:#x}\n    je {fault_label(v)}_chain" for v in rest)
    return f"""
qp_fault_ours:
    push 0
{_record("qp_fault", cpu_number)}
qp_fault_ring:
    mov byte ptr [rip + DOORBELL], 1
.globl qp_fault_doorbell_ret
qp_fault_doorbell_ret:
    mov rax, [rsp]
    test rax, rax
    jz qp_fault_ring
    mov rcx, [rsp + 8]
    add rsp, 16
    cmp rax, {ACTION_CHAIN}
    je qp_fault_chain
{_RESTORE}
    add rsp, 8
    iretq
qp_fault_chain:
{dispatch}
    jmp {fault_label(last)}_chain
"""


def stub_source(layout: StubLayout) -> str:
    """The assembly (Intel syntax) of the code page."""
    # Data addresses are defined relative to a label at the start of the
    # code: GAS assembles ``[rip + SYM]`` with an *absolute* SYM as a plain
    # displacement, but with a relocatable one as rip-relative.
    c = layout.code
    fast = layout.rtable != 0
    more = layout.slot2_hi > layout.slot2_lo
    data = ""
    if more:
        data += f"""
.set SLOT2_LO, qp_base + {layout.slot2_lo - c:#x}
.set SLOT2_HI, qp_base + {layout.slot2_hi - c:#x}
"""
    if fast:
        data += f"""
.set RTABLE, qp_base + {layout.rtable - c:#x}
.set REC_LO, qp_base + {layout.rec_lo - c:#x}
.set REC_HI, qp_base + {layout.rec_hi - c:#x}
.set EXTABLE, qp_base + {layout.extable - c:#x}
"""
    detours = layout.detour_hi != 0
    if detours:
        data += f"""
.set DETOUR_LO, qp_base + {layout.detour_lo - c:#x}
.set DETOUR_HI, qp_base + {layout.detour_hi - c:#x}
"""
    return f"""
qp_base:
{data}
.set DOORBELL, qp_base + {layout.doorbell - c:#x}
.set VARS, qp_base + {layout.vars - c:#x}
.set PTABLE, qp_base + {layout.ptable - c:#x}
.set SLOT_LO, qp_base + {layout.slot_lo - c:#x}
.set SLOT_HI, qp_base + {layout.slot_hi - c:#x}

/* vector 3, #BP: ours when the int3 is in the probe table. */
.globl qp_bp_entry
qp_bp_entry:
    push -1
{_SAVE}
    test qword ptr [rsp + {_CS}], 3
    jnz qp_bp_chain
    mov rax, [rsp + {_RIP}]
    dec rax
    /* The table in use (one load: the host switches tables with one store). */
    mov rsi, [rip + VARS + {VAR_PTABLE:#x}]
    mov rcx, [rsi + {HEADER_SHIFT}]
    mov rdx, {HASH_MULT:#x}
    imul rdx, rax
    shr rdx, cl
    mov rdi, [rsi + {HEADER_ADDRS}]
    mov r8, [rsi + {HEADER_MASK}]
qp_bp_lookup:
    mov rcx, [rdi + rdx * 8]
    cmp rcx, rax
    je {"qp_bp_found" if fast else "qp_bp_ours"}
    /* 0 ends the cluster; a tombstone (1) is passed over like any address. */
    test rcx, rcx
    jz qp_bp_foreign
    inc rdx
    and rdx, r8
    jmp qp_bp_lookup
qp_bp_foreign:
    /* Not a probe. If the int3 byte is gone, qprobes removed it after this
       vCPU hit it: resume at its address (Linux's kprobe_int3_handler). */
    cmp byte ptr [rax], 0xcc
    je qp_bp_chain
    mov [rsp + {_RIP}], rax
{_RESTORE}
    add rsp, 8
    iretq
{_fast_hit() if fast else ""}
{_ring(3, "qp_bp", error_code=False, cpu_number=layout.cpu_number)}

/* vector 1, #DB: ours while some vCPU single-steps a slot, or when rip is in
   a slot (a guest data breakpoint hit by a boosted copy). DR6 goes into
   orig_rax for the host. */
.globl qp_db_entry
qp_db_entry:
    push -1
{_SAVE}
    mov rax, dr6
    mov [rsp + {_ORIG_RAX}], rax
    cmp qword ptr [rip + VARS + {VAR_SS_ACTIVE:#x}], 0
    jne qp_db_ours
{_in_slots("qp_db", more)}
{_ring(1, "qp_db", error_code=False, debug=True, cpu_number=layout.cpu_number)}

/* the faults an instruction in a slot can raise: ours when rip is in a slot. */
{"".join(_slot_fault(v, e, fast, more, detours) for v, e in SLOT_FAULT_VECTORS.items())}
{_fault_doorbell(layout.cpu_number)}
/* kretprobe trampoline: a hijacked return lands here. The slot the return
   address was popped from is taken back with the trampoline's address still
   in it (so the host can tell a call that is still returning from a dead
   one), interrupts go off until the host has answered (no interrupt handler
   can overwrite this CPU's frame record, and the task cannot move or be
   preempted in here), the host writes the real return address into that
   slot, and the stub returns there with every register and flag as the
   function left them. */
.globl qp_kretprobe_trampoline
qp_kretprobe_trampoline:
    lea rsp, [rsp - 8]
    pushfq
    cli
    push -1
{_SAVE}
    push {KRETPROBE_VECTOR:#x}
    push 0
{_record("qp_kret", layout.cpu_number)}
qp_kret_ring:
    mov byte ptr [rip + DOORBELL], 1
.globl qp_kret_doorbell_ret
qp_kret_doorbell_ret:
    mov rax, [rsp]
    test rax, rax
    jz qp_kret_ring
    add rsp, 16
{_RESTORE}
    add rsp, 8
    popfq
    ret
.globl qp_kretprobe_trampoline_end
qp_kretprobe_trampoline_end:

/* Where a return whose real address nobody knows is sent: an invalid
   opcode, so that the guest kernel oopses in that task (Linux BUG()s when
   __kretprobe_find_ret_addr finds nothing). */
.globl qp_kretprobe_lost
qp_kretprobe_lost:
    ud2

/* jprobe_return: a jprobe's guest handler ends by jumping here. The host
   restores the registers and stack saved at the probe hit, by itself. */
.globl qp_jprobe_return
qp_jprobe_return:
    push 0
    pushfq
    push -1
{_SAVE}
    push {JPROBE_VECTOR:#x}
    push 0
{_record("qp_jprobe", layout.cpu_number)}
qp_jprobe_ring:
    mov byte ptr [rip + DOORBELL], 1
.globl qp_jprobe_doorbell_ret
qp_jprobe_doorbell_ret:
    jmp qp_jprobe_ring
"""


@dataclass(frozen=True)
class Stubs:
    """The assembled code page and the addresses of its entry points."""

    code: bytes
    symbols: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.symbols[name]


def assemble_at(source: str, vma: int) -> tuple[bytes, dict[str, int]]:
    """Assemble Intel-syntax ``source`` at ``vma`` with pwntools (GNU as and ld).

    Returns the code and the addresses of its labels.
    """
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection
    from pwnlib.asm import asm
    from pwnlib.context import context

    from qprobes.errors import ProbeError

    try:
        with context.local(arch="amd64", os="linux", log_level="error"):
            if context.cache_dir:
                # pwntools makes its cache directory after a check: two
                # processes doing it at once (pytest-xdist workers with a new
                # $HOME) make one of them fail.
                os.makedirs(os.path.join(context.cache_dir, "asm-cache"), exist_ok=True)
            path = asm(source, vma=vma, extract=False)
    except Exception as exc:  # pwntools raises PwnlibException with the assembler's output
        raise ProbeError(f"cannot assemble guest code: {exc}") from exc
    symbols: dict[str, int] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        text = elf.get_section_by_name(".shellcode")
        if text is None:
            raise ProbeError("the assembler produced no .shellcode section")
        code = bytes(text.data())
        base = text["sh_addr"]
        for section in elf.iter_sections():
            if isinstance(section, SymbolTableSection):
                for sym in section.iter_symbols():
                    if sym.name and sym["st_info"]["type"] in ("STT_NOTYPE", "STT_FUNC"):
                        symbols[sym.name] = sym["st_value"]
    if base != vma:
        raise ProbeError(f"code assembled at {base:#x}, wanted {vma:#x}")
    return code, symbols


def assemble_stubs(layout: StubLayout) -> Stubs:
    """Assemble the stubs at ``layout.code``."""
    code, symbols = assemble_at(stub_source(layout), layout.code)
    if len(code) > 4096:
        raise AssertionError(f"stubs take {len(code)} bytes, more than a page")
    return Stubs(code, {k: v for k, v in symbols.items() if k.startswith("qp_")})
