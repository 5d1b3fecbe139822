#!/usr/bin/env python3
"""Micro-benchmark of the GDB remote protocol layer against a real QEMU.

Starts ``qemu-system-x86_64 -S`` at reset (no guest needed), or uses an
existing stub with ``--socket PATH``, and times:

- one ``p`` round trip (read rip), one ``g``, one 64-byte ``m``;
- a bare socket ``p`` round trip, for the cost of the Python layers;
- a stop/continue cycle: a real-mode loop stores to a byte watched with
  Z2, so every ``cont`` ends in a watchpoint stop (no TB flush, as with
  qprobes' doorbell), with and without reading three registers per stop.

Not a test: numbers depend on the machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qprobes.remote.client import BreakpointType, GdbClient
from qprobes.wire.packet import frame

LOOP_ADDR = 0x1000
DOORBELL = 0x2000
LOOP_CODE = bytes.fromhex("a20020ebfb")  # mov [0x2000], al ; jmp back


def timed(label: str, count: int, body: Callable[[], object], rounds: int = 5) -> float:
    """Run ``body`` count times per round; print the median per-call time."""
    body()  # warm up
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            body()
        per_call.append((time.perf_counter() - start) / count)
    median = statistics.median(per_call)
    print(
        f"{label:<44} {median * 1e6:8.1f} us  "
        f"(min {min(per_call) * 1e6:.1f}, max {max(per_call) * 1e6:.1f}; {rounds}x{count})"
    )
    return median


def raw_round_trip(path: str) -> Callable[[], object]:
    """A ``p`` round trip on a bare socket with no decoding: the floor."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    packet = b"+" + frame(b"p10")

    def once() -> bytes:
        sock.sendall(packet)
        data = b""
        while not (len(data) >= 3 and data[-3:-2] == b"#"):
            data += sock.recv(4096)
        return data

    return once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="use a running stub instead of starting QEMU")
    parser.add_argument("-n", type=int, default=1000, help="calls per round")
    args = parser.parse_args()

    proc = None
    workdir = tempfile.TemporaryDirectory(prefix="qprobes-bench-")
    path = args.socket
    try:
        if path is None:
            binary = shutil.which("qemu-system-x86_64")
            if binary is None:
                print("qemu-system-x86_64 not found", file=sys.stderr)
                return 1
            path = str(Path(workdir.name) / "gdb.sock")
            cmd = [binary, "-S", "-nographic", "-nodefaults", "-display", "none", "-m", "64M",
                   "-accel", "tcg", "-gdb", f"unix:{path},server=on,wait=off"]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not Path(path).exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    print("QEMU did not start", file=sys.stderr)
                    return 1
                time.sleep(0.02)

        n = args.n
        with GdbClient.connect(path) as client:
            rip = client.layout["rip"].regnum
            print(f"stub: PacketSize={client.packet_size:#x}, no-ack={client.conn.no_ack}")
            timed("p (read rip)", n, lambda: client.read_register(rip))
            timed("g (608 bytes)", n, client.read_registers)
            timed("m (64 bytes)", n, lambda: client.read_memory(0x10000, 64))
            timed("M (16 bytes)", n, lambda: client.write_memory(0x10000, bytes(16)))
            timed("m (4096 bytes, 2 pipelined packets)", n // 4,
                  lambda: client.read_memory(0x10000, 4096))  # fmt: skip

            client.write_memory(LOOP_ADDR, LOOP_CODE)
            client.set_reg("cs", 0)
            client.set_reg("rip", LOOP_ADDR)
            client.insert_breakpoint(BreakpointType.WRITE, DOORBELL, 1)

            def cycle() -> None:
                client.cont()
                client.wait_stop()

            def cycle_with_regs() -> None:
                client.cont()
                client.wait_stop()
                client.read_register(rip)
                client.read_register(rip - 9)  # rsp
                client.read_register(rip + 13)  # cr3

            def cycle_with_g() -> None:
                client.cont()
                client.wait_stop()
                client.read_registers()

            timed("stop/continue cycle (Z2 watchpoint)", n, cycle)
            timed("  + three p packets per stop", n, cycle_with_regs)
            timed("  + one g packet per stop", n, cycle_with_g)
            client.remove_breakpoint(BreakpointType.WRITE, DOORBELL, 1)

        once = raw_round_trip(path)
        timed("bare socket p round trip (no client)", n, once)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(5)
        workdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
