"""Probes at ftrace sites: what the engine needs to know, as a hook.

Most Linux functions start with a 5-byte ``nop`` that ftrace rewrites at
run time into a ``call`` to its trampolines (``__fentry__`` sites, listed
in the kernel's live ``struct dyn_ftrace`` records). An ``int3`` written
there breaks ftrace (``ftrace_verify_code`` finds an unexpected byte and
ftrace shuts itself down). Linux puts a kprobe on such a site on ftrace
itself (``CONFIG_KPROBES_ON_FTRACE``, ``arch/x86/kernel/kprobes/ftrace.c``:
``kprobe_ftrace_handler`` shows the handlers the registers as if the int3
were at the site, then "emulates the single-step" of the nop by setting
``ip`` to ``addr + MCOUNT_INSN_SIZE`` for the post_handler).

qprobes cannot register an ``ftrace_ops`` from outside, so it does the
equivalent: the int3 goes on the instruction right after the site, which
runs with the very registers the site saw (the nop does nothing; a call to
an ftrace trampoline returns with every register restored), and the
handlers see ``rip`` = the site, the kprobe's ``addr``. That is only sound
when nothing else reaches that next instruction and the function's entry
still runs it: the engine checks that with the hook defined here, which
:mod:`qprobes.linux.ftrace` implements from the guest's own records.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from qprobes.arch.x86_64.insn import Insn

MCOUNT_INSN_SIZE = 5  # the 5-byte call/nop at an ftrace site (x86)


@dataclass(frozen=True)
class FtraceSite:
    """One ``struct dyn_ftrace`` record, its ``flags`` decoded."""

    ip: int
    flags: int
    refs: int  # ftrace_ops attached (flags & FTRACE_REF_MAX)
    enabled: bool  # FTRACE_FL_ENABLED: the site is a call now
    direct: bool  # FTRACE_FL_DIRECT: a direct trampoline (a BPF trampoline)
    ipmodify: bool  # FTRACE_FL_IPMODIFY: an ops that may change ip (livepatch)
    disabled: bool = False  # FTRACE_FL_DISABLED: ftrace leaves it alone

    def describe(self) -> str:
        """The record's state in a few words, for messages and logs."""
        parts = [f"{self.refs} ftrace_ops attached"]
        parts.append("enabled (a call)" if self.enabled else "a nop")
        if self.direct:
            parts.append("a direct trampoline")
        if self.ipmodify:
            parts.append("IPMODIFY")
        if self.disabled:
            parts.append("disabled")
        return ", ".join(parts)


class FtraceRecords(Protocol):
    """The guest kernel's ftrace sites and the text it reserves.

    ``site(addr)`` is the live record whose ip is ``addr``, or None when
    ``addr`` is not an ftrace site. ``text_reserved(start, end)`` names why
    the kernel may patch a byte of ``[start, end)`` (a jump-label site, as
    ``jump_label_text_reserved``), or None.
    """

    def site(self, addr: int) -> FtraceSite | None: ...

    def text_reserved(self, start: int, end: int) -> str | None: ...


def branches_to(insns: Iterable[Insn], target: int) -> list[int]:
    """Addresses of the relative jumps and calls in ``insns`` that go to ``target``."""
    return [insn.addr for insn in insns if insn.branch_target == target]
