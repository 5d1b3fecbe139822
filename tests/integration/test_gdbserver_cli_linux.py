"""``qprobes trace --gdb-listen``: a real gdb on the endpoint of the command line.

gdb connects while the guest command runs, sees the probed function's
original code, lets the guest run and is still attached when the command
ends: qprobes detaches, gdb is told and its connection closes, and the
trace is printed as without gdb.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_vm
from tests.integration.cli_process import CliProcess
from tests.integration.terminal import CLI
from tests.integration.test_gdbserver_linux import GDB, Cli

pytestmark = pytest.mark.vm


def test_trace_serves_gdb_until_it_ends(tmp_path: Path) -> None:
    if not shutil.which(GDB):
        require_vm(f"{GDB} is not installed (scripts/install.sh installs gdb)")
    sock = tmp_path / "gdb.sock"
    loop = "for i in $(seq 150); do cat /etc/hostname >/dev/null; sleep 0.1; done; echo qp-end"
    proc = CliProcess(["trace", "--gdb-listen", f"unix:{sock}",
                       "p:myopen do_sys_openat2 path=+0(%si):string", "--", loop],
                      tmp_path / "run")  # fmt: skip
    try:
        proc.wait_for("gdb endpoint at", timeout=300)
    except AssertionError as exc:
        if "cannot be booted" in str(exc) or "no guest prompt" in str(exc):
            require_vm(str(exc))
        raise
    assert f"gdb endpoint at {sock}" in proc.stderr
    found = subprocess.run([*CLI, "symbols", "do_sys_openat2"], capture_output=True, text=True,
                           timeout=300, check=True)  # fmt: skip
    func = int(found.stdout.split()[0], 16)
    gdb = Cli()
    try:
        gdb.connect(str(sock))
        text = gdb(f"x/3i {func:#x}")
        assert "int3" not in text and "push" in text, text
        gdb.cont()
        # Still attached when the guest command ends: qprobes says goodbye and closes.
        seen = gdb.gdb.wait_for(lambda r: "qprobes: detaching" in str(r.get("payload")), 120,
                                "qprobes' goodbye")  # fmt: skip
        assert seen
    finally:
        gdb.close()
    assert proc.wait(180) == 0, proc.stderr[-3000:]
    assert proc.stdout.count('path="/etc/hostname"') >= 100, proc.stdout[-2000:]
    assert "qp-end" in proc.stderr
    assert not sock.exists()
