"""Driving the qtest kernel from the host: its target table, call counters and mailbox.

The layouts are those of ``kernels/qtest/abi.h`` (see kernels/qtest/README.md).
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from dataclasses import dataclass

from qprobes.errors import MachineError
from qprobes.frontends.session import Session

MBOX_SELFCHECK = 1
MBOX_HOT = 2
MBOX_RUN = 3
MBOX_EXIT = 4

TFLAG_SMP = 1
TFLAG_TRAPS = 2

KERNEL_BASE = 0xFFFF_FFFF_8000_0000  # qtest maps phys 0.. here


@dataclass(frozen=True)
class QtestTarget:
    index: int
    name: str
    addr: int
    size: int
    flags: int

    @property
    def end(self) -> int:
        return self.addr + self.size


class QtestDriver:
    """The qtest guest of a :class:`Session` booted with :meth:`Session.qtest`."""

    def __init__(self, session: Session) -> None:
        if session.symbols is None:
            raise MachineError("qtest needs its ELF symbols")
        self.session = session
        self.target = session.target
        syms = session.symbols
        self.mailbox_addr = syms.address("qtest_mailbox")
        self.calls_addr = syms.address("qtest_calls")
        count = self.target.read_u64(syms.address("qtest_ntargets"))
        raw = self.target.read(syms.address("qtest_targets"), 32 * count)
        self.targets: list[QtestTarget] = []
        for i in range(count):
            _name_ptr, addr, size, flags = struct.unpack_from("<QQQQ", raw, 32 * i)
            found = syms.resolve(addr)
            name = found[0].name if found else f"target{i}"
            self.targets.append(QtestTarget(i, name, addr, size, flags))
        self.by_name = {t.name: t for t in self.targets}

    def _phys(self, vaddr: int) -> int:
        return vaddr - KERNEL_BASE

    def _read_u64_running(self, vaddr: int) -> int:
        """Read guest data while the guest runs (through the QEMU process)."""
        hostmem = self.session.hostmem
        if hostmem is None:
            raise MachineError("reading a running guest needs a QEMU launched by qprobes")
        return int(struct.unpack("<Q", hostmem.read_phys(self._phys(vaddr), 8))[0])

    def calls(self) -> list[int]:
        """Every target's call counter (guest stopped)."""
        raw = self.target.read(self.calls_addr, 8 * len(self.targets))
        return list(struct.unpack(f"<{len(self.targets)}Q", raw))

    def post(self, cmd: int, arg: int) -> int:
        """Write a mailbox command (guest stopped); returns the current ``done`` count."""
        done = self.target.read_u64(self.mailbox_addr + 16)
        self.target.write_u64(self.mailbox_addr + 8, arg)
        self.target.write_u64(self.mailbox_addr, cmd)
        return done

    def mailbox(self, cmd: int, arg: int, timeout: float = 30.0) -> int:
        """Run one mailbox command with probes serviced; returns its result."""
        done = self.post(cmd, arg)
        done_addr = self.mailbox_addr + 16
        self.session.run(until=lambda: self._read_u64_running(done_addr) != done, timeout=timeout)
        if self.target.read_u64(done_addr) == done:
            raise MachineError(f"qtest mailbox command {cmd} did not finish in {timeout} s")
        return self.target.read_u64(self.mailbox_addr + 24)

    def run_target(self, name: str, n: int = 1) -> int:
        """n checked calls of target ``name``; returns the number that failed."""
        return self.mailbox(MBOX_RUN, (self.by_name[name].index << 32) | n)

    def selfcheck(self, rounds: int = 1) -> int:
        """``rounds`` self-checks; returns the number of failed targets."""
        return self.mailbox(MBOX_SELFCHECK, rounds)

    def hot(self, n: int) -> int:
        """n direct calls of t_hot; returns the guest's rdtsc delta."""
        return self.mailbox(MBOX_HOT, n)

    def trace(self, cmd: int, arg: int, ranges: list[tuple[int, int]],
              max_steps: int = 200_000) -> Counter[int]:  # fmt: skip
        """Single-step a mailbox command through the gdbstub, counting executed
        addresses inside ``ranges``: the ground truth for probe hit counts.

        Run with no probes armed.
        """
        client = self.target.client
        vcpu = self.target.vcpus[0]
        done = self.post(cmd, arg)
        counts: Counter[int] = Counter()
        start = time.monotonic()
        before = self.target.registers(vcpu)
        for _ in range(max_steps):
            client.step(vcpu)
            client.wait_stop(10.0)
            after = self.target.registers(vcpu)
            if after == before:
                # Now and then QEMU reports a step that executed nothing
                # (every register unchanged); that is not an execution.
                continue
            before = after
            rip = after.rip
            for lo, hi in ranges:
                if lo <= rip < hi:
                    counts[rip] += 1
                    break
            if self.target.read_u64(self.mailbox_addr + 16) != done:
                return counts
        raise MachineError(
            f"trace of mailbox command {cmd} took more than {max_steps} steps "
            f"({time.monotonic() - start:.1f} s)"
        )
