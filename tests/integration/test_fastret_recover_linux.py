"""A ``qprobes trace --fast`` session killed while a task sleeps inside a
fast return-probed function: the instance store (found through the
journal) holds the hijacked return address, and ``qprobes attach
--recover`` puts it back; the sleeper returns normally later."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from qprobes.machine.linux import LINUX_PROMPT
from tests.integration.attached import BAD, CLI, HOT, busy_guest, snapshot

pytestmark = pytest.mark.vm


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


def test_recover_puts_back_fast_return_addresses() -> None:
    machine, addrs = busy_guest()
    try:
        address = str(machine.gdb_socket)
        start, size = machine.config.reserved
        reserve = f"{start:#x}:{size:#x}"
        before = snapshot(address, addrs)
        proc = subprocess.Popen([*CLI, "trace", "--attach", address, "--reserve", reserve, "-q",
                                 "--fast", "--no-watchdog", *HOT], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)  # fmt: skip
        assert proc.stderr is not None
        seen, deadline = "", time.monotonic() + 120
        while "Ctrl-C to stop" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        assert "Ctrl-C to stop" in seen, seen
        # Every return probe of HOT is on the fast path (its entry boosted).
        assert "slow path" not in seen, seen
        machine.console.command("sleep 30 & echo started-sleep", LINUX_PROMPT, timeout=120)
        time.sleep(4)
        proc.kill()  # SIGKILL: no detach, no clean-up
        proc.wait(timeout=30)

        recovered = run("attach", address, "--recover", "--reserve", reserve)
        assert recovered.returncode == 0, recovered.stderr
        match = re.search(r"(\d+) return addresses", recovered.stdout)
        assert match, recovered.stdout + recovered.stderr
        assert int(match.group(1)) >= 1  # the sleeper's, from the instance store

        mark = len(machine.console_text())
        cmd = "kill %3 2>/dev/null; sleep 2; wait %3; echo qp-alive; dmesg"
        out = machine.console.command(cmd, LINUX_PROMPT, timeout=120)
        text = str(out) + machine.console_text()[mark:]
        assert "qp-alive" in text
        assert not [line for line in text.splitlines() if BAD.search(line)], text[-3000:]
        assert snapshot(address, addrs) == before, "what qprobes wrote is not all undone"
    finally:
        machine.shutdown()
