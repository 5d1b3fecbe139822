"""x86_64 architecture layer: instruction analysis, slot copies, step fixups.

The host-side counterpart of Linux's arch/x86 kprobes code: :mod:`.insn`
decodes and analyses the probed instruction and builds the bytes of its
instruction slot; :mod:`.fixups` computes rip, rflags and the stack word to
write after the copy has been single-stepped. Both are pure.
"""

from qprobes.arch.x86_64.fixups import (
    X86_EFLAGS_IF,
    X86_EFLAGS_TF,
    FaultFixup,
    KprobeFlags,
    ResumeResult,
    fault_fixup,
    int3_passthrough,
    prepare_singlestep,
    resume_execution,
    set_current_kprobe,
    singlestep_rip,
)
from qprobes.arch.x86_64.insn import (
    INT3,
    JMP_REL32,
    JMP_REL32_SIZE,
    MAX_INSN_SIZE,
    SLOT_SIZE,
    Fixup,
    Insn,
    InsnAnalysis,
    analyze,
    boosted_copy,
    can_probe,
    copy_instruction,
    decode,
    decode_function,
    flags_image,
    instruction_boundaries,
    skip_prefixes,
    spanning_instruction,
    synthesize_reljump,
)

__all__ = [
    "INT3",
    "JMP_REL32",
    "JMP_REL32_SIZE",
    "MAX_INSN_SIZE",
    "SLOT_SIZE",
    "X86_EFLAGS_IF",
    "X86_EFLAGS_TF",
    "FaultFixup",
    "Fixup",
    "Insn",
    "InsnAnalysis",
    "KprobeFlags",
    "ResumeResult",
    "analyze",
    "boosted_copy",
    "can_probe",
    "copy_instruction",
    "decode",
    "decode_function",
    "fault_fixup",
    "flags_image",
    "instruction_boundaries",
    "int3_passthrough",
    "prepare_singlestep",
    "resume_execution",
    "set_current_kprobe",
    "singlestep_rip",
    "skip_prefixes",
    "spanning_instruction",
    "synthesize_reljump",
]
