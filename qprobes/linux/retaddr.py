"""The guest's own return-address hooks, seen through.

A qprobes return probe armed after an ftrace site runs after whatever the
guest attached to that site, so the return address it finds on the stack
may already be one of the guest's trampolines:

* the guest's own kretprobes (``CONFIG_KRETPROBE_ON_RETHOOK``,
  ``arch/x86/kernel/rethook.c``: ``arch_rethook_prepare`` saves
  ``stack[0]`` in a ``struct rethook_node`` {..., llist, rethook,
  ret_addr, frame} with ``frame = regs->sp`` (the stack slot), pushed on
  ``current->rethooks``, and writes ``arch_rethook_trampoline`` there);
* the function graph tracer (``prepare_ftrace_return``: the real address
  goes to ``current->ret_stack[curr_ret_stack]``, a ``struct
  ftrace_ret_stack`` {ret, func, calltime, ..., retp}, ``retp`` the stack
  slot; the slot gets ``return_to_handler``).

The guest's trampolines still do the returning; this only names the real
caller for reports, as Linux's ``rethook_find_ret_addr`` and
``ftrace_graph_ret_addr`` do for unwinders. Layouts come from BTF.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from qprobes.errors import QprobesError, SymbolError
from qprobes.probes.context import HitContext
from qprobes.symbols.linux import LinuxKernel

MAX_NODES = 256  # live rethook nodes per task to look through


class GuestReturnHooks:
    """``see_through`` for :class:`qprobes.probes.kretprobe.KretprobeManager`."""

    def __init__(self, kernel: LinuxKernel) -> None:
        btf = kernel.btf
        if btf is None:
            raise SymbolError("no BTF: the guest's return hooks cannot be read")
        self.kernel = kernel
        symbols = kernel.symbols
        self._rethook: tuple[int, int, int, int, int] | None = None
        self._graph: tuple[int, int, int, int, int, int] | None = None
        if "arch_rethook_trampoline" in symbols:
            found = self._offsets(btf.struct_member_offset, [
                ("task_struct", "rethooks"), ("rethook_node", "llist"),
                ("rethook_node", "ret_addr"), ("rethook_node", "frame")])  # fmt: skip
            if found is not None:
                head, llist, ret, frame = found
                self._rethook = (symbols.address("arch_rethook_trampoline"), head, llist, ret,
                                 frame)  # fmt: skip
        if "return_to_handler" in symbols:
            found = self._offsets(btf.struct_member_offset, [
                ("task_struct", "ret_stack"), ("task_struct", "curr_ret_stack"),
                ("ftrace_ret_stack", "ret"), ("ftrace_ret_stack", "retp")])  # fmt: skip
            if found is not None:
                stack, curr, ret, retp = found
                size = btf.find_struct("ftrace_ret_stack").size
                self._graph = (symbols.address("return_to_handler"), stack, curr, ret, retp,
                               size)  # fmt: skip

    @property
    def rethook(self) -> tuple[int, int, int, int, int] | None:
        """(``arch_rethook_trampoline``, and the offsets of ``task_struct.rethooks``,
        ``rethook_node.llist``, ``.ret_addr``, ``.frame``), or None without rethooks."""
        return self._rethook

    @staticmethod
    def _offsets(member: Callable[[str, str], tuple[int, int]],
                 names: list[tuple[str, str]]) -> list[int] | None:  # fmt: skip
        try:
            return [member(s, m)[0] for s, m in names]
        except SymbolError:
            return None  # built without that hook

    def __call__(self, ctx: HitContext, slot: int, ret_addr: int) -> int:
        """The real return address behind ``ret_addr`` (found at ``slot``)."""
        try:
            return self._see_through(ctx, slot, ret_addr)
        except (QprobesError, struct.error):
            return ret_addr  # unreadable: report what the stack held

    def _see_through(self, ctx: HitContext, slot: int, ret_addr: int) -> int:
        for _ in range(4):  # one hook behind another
            if self._rethook is not None and ret_addr == self._rethook[0]:
                found = self._from_rethook(ctx, slot)
            elif self._graph is not None and ret_addr == self._graph[0]:
                found = self._from_graph(ctx, slot)
            else:
                return ret_addr
            if found is None:
                return ret_addr
            ret_addr = found
        return ret_addr

    def _u64(self, ctx: HitContext, addr: int) -> int:
        return int(struct.unpack("<Q", ctx.read(addr, 8))[0])

    def _from_rethook(self, ctx: HitContext, slot: int) -> int | None:
        assert self._rethook is not None
        trampoline, head, llist, ret, frame = self._rethook
        task = self.kernel.current(ctx.gs_base, ctx.read)
        if task is None:
            return None
        node = self._u64(ctx, task + head)  # llist_head.first
        for _ in range(MAX_NODES):
            if not node:
                return None
            rh = node - llist
            if self._u64(ctx, rh + frame) == slot:
                found = self._u64(ctx, rh + ret)
                return found if found != trampoline else None
            node = self._u64(ctx, node)  # llist_node.next
        return None

    def _from_graph(self, ctx: HitContext, slot: int) -> int | None:
        assert self._graph is not None
        _handler, stack_off, curr_off, ret, retp, size = self._graph
        task = self.kernel.current(ctx.gs_base, ctx.read)
        if task is None:
            return None
        stack = self._u64(ctx, task + stack_off)
        (curr,) = struct.unpack("<i", ctx.read(task + curr_off, 4))
        if not stack or curr < 0:
            return None
        for i in range(min(curr, 64), -1, -1):
            entry = stack + i * size
            if self._u64(ctx, entry + retp) == slot:
                return self._u64(ctx, entry + ret)
        return None
