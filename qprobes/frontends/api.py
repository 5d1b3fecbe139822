"""The Python API behind the command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from qprobes.errors import MachineError
from qprobes.machine.guests import QTEST_EXIT_PASS, qtest_config
from qprobes.machine.qemu import MachineConfig, QemuMachine, attach


def qtest_selfcheck(
    loops: int = 1,
    smp: int = 1,
    accel: str = "tcg",
    cpu: str | None = None,
    out: TextIO = sys.stdout,
    timeout: float = 120.0,
) -> int:
    """Boot qtest, connect to its gdbstub, run its self-check and relay the console.

    Returns 0 when the self-check passed, 1 otherwise.
    """
    config = qtest_config(
        append=f"qtest.auto=selfcheck qtest.loops={loops}", smp=smp, accel=accel, cpu=cpu
    )
    started = time.monotonic()
    with QemuMachine(config) as machine:
        client = machine.client
        target = machine.target
        print(
            f"qprobes: QEMU pid {machine.pid}, gdbstub {machine.gdb_socket}: "
            f"{len(target.vcpus)} vCPU(s), PacketSize={client.packet_size:#x}, "
            f"{len(client.layout.registers)} registers from target.xml",
            file=out,
        )
        console = machine.console
        target.resume()
        deadline = started + timeout
        while machine.alive():
            data = console.tube.recv(4096, timeout=0.2)
            if data:
                out.write(data.decode(errors="replace").replace("\r\n", "\n"))
                out.flush()
            if time.monotonic() > deadline:
                raise MachineError(f"qtest did not finish within {timeout} s")
        status = machine.wait(5.0)
        rest = console.tube.recvall(timeout=0.2) if console.tube.connected() else b""
        if rest:
            out.write(rest.decode(errors="replace").replace("\r\n", "\n"))
    elapsed = time.monotonic() - started
    ok = status == QTEST_EXIT_PASS
    verdict = "passed" if ok else f"FAILED (QEMU exit status {status})"
    print(f"qprobes: qtest self-check {verdict} in {elapsed:.2f} s", file=out)
    return 0 if ok else 1


def boot_interactive(
    kernel: str | None = None,
    initrd: str | None = None,
    append: str = "",
    smp: int = 1,
    memory_mib: int = 512,
    accel: str = "tcg",
    cpu: str | None = None,
) -> int:
    """Boot a guest and hand its serial console to the terminal until it exits."""
    if kernel is None:
        config = qtest_config(append=append, smp=smp, accel=accel, cpu=cpu)
    else:
        config = MachineConfig(
            kernel=Path(kernel), initrd=Path(initrd) if initrd else None, append=append,
            smp=smp, memory_mib=memory_mib, accel=accel, cpu=cpu,
        )  # fmt: skip
    with QemuMachine(config) as machine:
        print(f"qprobes: gdbstub at {machine.gdb_socket} (pid {machine.pid})", file=sys.stderr)
        machine.target.resume()
        machine.console.interactive()
    return 0


def attach_info(address: str, out: TextIO = sys.stdout) -> int:
    """Connect to a running QEMU's gdbstub, describe the guest, and detach."""
    target = attach(address)
    client = target.client
    try:
        with target.stopped():
            vcpus = target.vcpus
            print(f"qprobes: attached to {address}: {len(vcpus)} vCPU(s)", file=out)
            for vcpu in vcpus:
                regs = target.registers(vcpu)
                idt = target.idt(vcpu)
                print(
                    f"  vCPU {vcpu}: rip={regs.rip:#018x} rsp={regs.rsp:#018x} "
                    f"cr3={regs.cr3:#x} IDT={idt.base:#x}/{idt.limit:#x}",
                    file=out,
                )
    finally:
        client.detach()
        client.close()
    return 0
