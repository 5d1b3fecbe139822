"""Tracing a real Linux guest: the CLI's acceptance cases and a comparison
with the guest's own kprobe_events.

The comparison arms Linux's kprobes (at function entry, through ftrace) and
qprobes' probes (on the first instruction after the ftrace site) on the same
functions at the same time, runs one workload between two trace_marker
writes, and requires both to have seen the same calls with the same
arguments, in the same order.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.frontends.session import Session
from qprobes.tracing import TraceEvent, Tracer

pytestmark = pytest.mark.vm

# Functions whose first instruction after the ftrace nop differ in class.
FUNCTIONS = {
    "do_sys_openat2": "push",
    "vfs_read": "push",
    "__x64_sys_openat": "sub rsp",
    "__x64_sys_read": "load through a register",
    "alloc_empty_file": "rip-relative load",
    "__d_lookup_rcu": "rip-relative load",
    "d_alloc_pseudo": "call rel32",
    "fput": "read-modify-write with a ds prefix",
    "mnt_drop_write": "gs: rip-relative inc",
    "putname": "cmp with an immediate",
}
WORKLOAD = "qp-work 2; echo piped | cat; qp-open 5 /etc/hostname"
FTRACE_NOP = bytes.fromhex("0f1f440000")
ENDBR64 = bytes.fromhex("f30f1efa")


def first_real_instruction(session: Session, name: str) -> tuple[int, x86insn.Insn]:
    """Offset of the first instruction after the ftrace site, and that instruction."""
    addr = session.symbols.address(name)  # type: ignore[union-attr]
    code = session.target.read(addr, 32)
    off = 0
    if code.startswith(ENDBR64):
        off += 4
    if code[off:].startswith(FTRACE_NOP) or code[off] == 0xE8:  # nop, or ftrace's call
        off += 5
    return off, x86insn.decode(code[off:], addr + off)


def test_first_instructions_cover_the_interesting_classes(linux: Session) -> None:
    seen = {}
    for name in FUNCTIONS:
        _, insn = first_real_instruction(linux, name)
        seen[name] = insn
    assert any(i.is_riprel for i in seen.values())
    assert any(i.mnemonic == "call" for i in seen.values())
    assert any(i.mnemonic == "push" for i in seen.values())
    assert len({i.mnemonic for i in seen.values()}) >= 5


def test_open_path_and_return_value(linux: Session) -> None:
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    tracer.add("p:myopen do_sys_openat2 path=+0(%si):string")
    tracer.add("r:myret do_sys_openat2 ret=$retval:s32")
    try:
        linux.command("cat /etc/hostname")
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
    opens = [e for e in events if e.event == "myopen" and e.comm == "cat"]
    rets = [e for e in events if e.event == "myret" and e.comm == "cat"]
    assert [e.fields["path"] for e in opens] == ["/etc/hostname"]
    assert opens[0].format().strip().startswith("cat-")
    assert re.search(r"myopen: \(do_sys_openat2\+0x0/0x[0-9a-f]+\) path=\"/etc/hostname\"$",
                     opens[0].format())  # fmt: skip
    # cat's first open gets the lowest free descriptor: 3.
    assert [e.fields["ret"] for e in rets] == [3]
    assert rets[0].ret_to is not None and " <- do_sys_openat2)" in rets[0].format()


def parse_ftrace(text: str) -> list[tuple[str, int, str, dict[str, str]]]:
    """(comm, pid, event, fields) from the guest's trace file; markers as event 'MARK'."""
    rows = []
    line_re = re.compile(r"^\s*(.+)-(\d+)\s+\[\d+\]\s+\S*\s*[\d.]+: (\S+): (.*)$")
    for line in text.splitlines():
        m = line_re.match(line)
        if not m:
            continue
        comm, pid, event, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if event == "tracing_mark_write":
            rows.append((comm, pid, "MARK", {"text": rest.strip()}))
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", rest.split(")", 1)[1]))
        rows.append((comm, pid, event, fields))
    return rows


def window(rows: list[tuple[str, int, str, dict[str, str]]]) -> list[tuple[int, str, str, str]]:
    start = next(i for i, r in enumerate(rows) if r[2] == "MARK" and r[3]["text"] == "START")
    end = next(i for i, r in enumerate(rows) if r[2] == "MARK" and r[3]["text"] == "END")
    return [(pid, ev, f["a"], f["b"]) for _, pid, ev, f in rows[start + 1 : end]]


def test_same_calls_and_arguments_as_the_guests_kprobe_events(linux: Session) -> None:
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    linux_defs = []
    for i, name in enumerate(FUNCTIONS):
        off, _ = first_real_instruction(linux, name)
        linux_defs.append(f"p:lx/e{i} {name} a=%di b=%si")
        tracer.add(f"p:qp/e{i} {name}+{off} a=%di b=%si")
    tracer.add("p:qp/mark tracing_mark_write text=+0(%si):ustring")
    tr = "/sys/kernel/tracing"
    setup = " && ".join(f"echo '{d}' >> {tr}/kprobe_events" for d in linux_defs)
    try:
        out = linux.command(f"echo > {tr}/trace && {setup} && echo 1 > {tr}/events/lx/enable "
                            "&& echo configured")  # fmt: skip
        assert "configured" in out, out
        linux.command(f"echo START > {tr}/trace_marker; {WORKLOAD}; echo END > {tr}/trace_marker",
                      timeout=120)  # fmt: skip
        linux.command(f"echo 0 > {tr}/events/lx/enable")
        trace_text = linux.command(f"cat {tr}/trace", timeout=120)
        profile = linux.command(f"cat {tr}/kprobe_profile")
    finally:
        linux.command(f"echo 0 > {tr}/events/lx/enable; echo > {tr}/kprobe_events")
        for name in list(tracer.probes):
            tracer.remove(name)
    theirs = window(parse_ftrace(trace_text))
    ours_rows = []
    for e in events:
        if e.event == "mark":
            text = str(e.fields["text"]).strip()
            ours_rows.append((e.comm or "", e.pid or 0, "MARK", {"text": text}))
        else:
            ours_rows.append((e.comm or "", e.pid or 0, "e" + e.event[1:],
                              {k: f"{v:#x}" for k, v in e.fields.items()}))  # fmt: skip
    ours = window(ours_rows)
    assert "lx/e0" in profile.replace(" ", "/") or "e0" in profile
    counts = {name: sum(1 for r in theirs if r[1] == f"e{i}") for i, name in enumerate(FUNCTIONS)}
    assert all(counts.values()), f"a function never ran in the workload: {counts}"
    print(f"kprobe_events and qprobes agree on {len(theirs)} calls: {counts}")
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    assert ours == theirs


def qprobes_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qprobes.frontends.cli", *args],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_cli_trace_text_and_json_with_kaslr() -> None:
    probe = "p:myopen do_sys_openat2 path=+0(%si):string"
    text = qprobes_cli("trace", "--kaslr", probe, "--", "cat", "/etc/hostname")
    assert text.returncode == 0, text.stderr
    lines = [line for line in text.stdout.splitlines() if "myopen:" in line]
    assert any(line.strip().startswith("cat-") and 'path="/etc/hostname"' in line
               for line in lines), text.stdout  # fmt: skip
    assert "kprobes/myopen:" in text.stderr and "missed" in text.stderr
    js = qprobes_cli("trace", "--json", probe, "--", "cat", "/etc/hostname")
    assert js.returncode == 0, js.stderr
    hits = [json.loads(line) for line in js.stdout.splitlines() if line.startswith("{")]
    cat = [h for h in hits if h["comm"] == "cat"]
    assert cat and cat[0]["fields"]["path"] == "/etc/hostname"
    assert cat[0]["symbol"] == "do_sys_openat2" and cat[0]["event"] == "myopen"


def test_cli_errors_are_one_clear_line() -> None:
    bad = qprobes_cli("trace", "p:x do_sys_openat2 path=+0(%zz):string", "--", "true")
    assert bad.returncode == 2
    first, spec, caret = bad.stderr.strip("\n").splitlines()
    assert first.startswith("qprobes: error: Invalid register name (column ")
    assert spec.strip() == "p:x do_sys_openat2 path=+0(%zz):string"
    assert spec.index("%zz") == caret.index("^")
    unknown = qprobes_cli("trace", "p:x no_such_function_here", "--", "true")
    assert unknown.returncode != 0
    assert "no_such_function_here" in unknown.stderr
    assert "Traceback" not in unknown.stderr and "Traceback" not in bad.stderr


def test_filter_and_btf_arguments(linux: Session) -> None:
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    # A parameter by its BTF name; $arg3->flags reads struct open_how's
    # member through the pointer; +0($arg2):string is the same string as
    # the guest's own (6.1) kprobe_events spells it (named by position).
    tp = tracer.add("p:btfopen do_sys_openat2 filename:string flags=$arg3->flags:x64 "
                    "+0($arg2):string", filter_text='filename ~ "/etc/host*"')  # fmt: skip
    try:
        linux.command("cat /etc/hostname; cat /proc/version > /dev/null")
    finally:
        tracer.remove("kprobes/btfopen")
    assert events, "no event passed the filter"
    assert all(e.fields["filename"] == "/etc/hostname" for e in events)
    assert all(e.fields["arg3"] == "/etc/hostname" for e in events)
    assert tp.filtered > 0  # /proc/version and the shell's own opens were filtered out
    # O_RDONLY | O_LARGEFILE as the kernel builds it for a plain open(2).
    assert all(int(e.fields["flags"]) & 0o3 == 0 for e in events)  # type: ignore[call-overload]


def test_kretprobe_detach_restores_a_sleeping_tasks_return_address(linux: Session) -> None:
    """A return probe on a function a task sleeps in: unregistering while the
    task sleeps must leave its stack returning to the real caller."""
    rets: list[int] = []
    rp = linux.kretprobe("do_nanosleep", lambda rp, ctx: rets.append(ctx.retval))
    linux.command("(sleep 2; echo slept > /tmp/slept) &")
    linux.run(timeout=0.5)
    assert len(rp.instances) == 1, "sleep should be inside do_nanosleep"
    slot = rp.instances[0].stack_slot
    trampoline = linux.kretprobes.trampoline
    assert linux.target.read_u64(slot) == trampoline
    linux.kretprobes.detach()  # what detaching does for live instances
    linux.unregister(rp)
    assert linux.target.read_u64(slot) != trampoline
    out = linux.command("sleep 2; cat /tmp/slept")
    assert "slept" in out and not rets


def test_ctrl_c_detaches_cleanly() -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "qprobes.frontends.cli", "trace",
         "p:vr vfs_read", "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 120
    seen = ""
    while "Ctrl-C to stop" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "Ctrl-C to stop" in seen, seen
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "kprobes/vr:" in err and "hits" in err
    assert "Traceback" not in err


def test_page_table_isolation_guest() -> None:
    """With an Intel CPU model Linux turns PTI on: exceptions from user mode
    enter with the user page tables, so qprobes' stubs must be mapped there."""
    session = Session.linux(cpu="Skylake-Client")
    try:
        assert "isolation: enabled" in session.command("dmesg | grep -i 'page tables isolation'")
        assert session.engine.area._user is not None
        events: list[TraceEvent] = []
        tracer = Tracer(session, events.append)
        tracer.add("p:myopen do_sys_openat2 path=+0(%si):string")
        # User-mode page faults, syscalls and int3-free user code all run
        # through the redirected vectors' stubs.
        out = session.command("qp-work 3; cat /etc/hostname")
        assert "qprobes-guest" in out
        assert any(e.fields["path"] == "/etc/hostname" for e in events)
        tracer.remove("kprobes/myopen")
        session.engine.detach()
        assert "alive" in session.command("echo alive")
    finally:
        session.close()


def test_symbols_from_a_system_map_with_kaslr(linux: Session, tmp_path: object) -> None:
    """--symbols takes a System.map (unslid addresses); qprobes finds the slide."""
    from pathlib import Path

    from qprobes.symbols.linux import LinuxKernel

    assert linux.kernel is not None
    slide = linux.kernel.slide
    entries = getattr(linux.symbols, "entries", list(linux.symbols or []))
    lines = [
        f"{s.addr - slide:016x} {'T' if s.kind == 'func' else 'D'} {s.name}"
        for s in entries
        if s.addr >> 63
    ]
    path = Path(str(tmp_path)) / "System.map"
    path.write_text("\n".join(lines) + "\n")
    session = Session.linux(kaslr=True, symbols_file=str(path))
    try:
        assert session.kernel is not None
        own = LinuxKernel.load(session.target)  # the guest's kallsyms, for reference
        assert session.kernel.slide == own.slide
        for name in ("do_sys_openat2", "vfs_read", "_text"):
            assert session.symbols.address(name) == own.symbols.address(name)  # type: ignore[union-attr]
        events: list[TraceEvent] = []
        Tracer(session, events.append).add("p:myopen do_sys_openat2 path=+0(%si):string")
        session.command("cat /etc/hostname")
        assert any(e.fields["path"] == "/etc/hostname" for e in events)
    finally:
        session.close()


def test_cli_trace_attached_to_a_running_qemu() -> None:
    """`qprobes trace --attach` on a QEMU started elsewhere, with memory kept
    for qprobes by the guest's own memmap=; the workload is typed by the test."""
    import time

    from qprobes.machine.linux import LINUX_PROMPT, linux_config
    from qprobes.machine.qemu import QemuMachine

    machine = QemuMachine(linux_config(append="qprobes.echo=0"))
    machine.launch()
    try:
        machine.target.resume()
        machine.console.recvuntil(LINUX_PROMPT, timeout=120)
        machine.release_gdbstub()
        start, size = machine.config.reserved
        proc = subprocess.Popen(
            [sys.executable, "-m", "qprobes.frontends.cli", "trace", "--attach",
             str(machine.gdb_socket), "--reserve", f"{start:#x}:{size:#x}", "--duration", "30",
             "p:myopen do_sys_openat2 path=+0(%si):string"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 120
        while "Ctrl-C to stop" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "Ctrl-C to stop" in seen, seen
        machine.console.sendline("cat /etc/hostname")
        machine.console.recvuntil(LINUX_PROMPT, timeout=60)
        proc.send_signal(__import__("signal").SIGINT)
        out, err = proc.communicate(timeout=120)
        assert 'path="/etc/hostname"' in out, (out, err)
        # Detached: the guest runs on without qprobes.
        machine.console.sendline("echo still-here")
        assert b"still-here" in machine.console.recvuntil(LINUX_PROMPT, timeout=60)
    finally:
        machine.shutdown()


def test_cli_symbols_lists_matches_with_sizes() -> None:
    result = qprobes_cli("symbols", "--kaslr", "vfs_rea*")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    names = {row[3] for row in rows}
    assert {"vfs_read", "vfs_readv"} <= names
    for addr, size, kind, _ in rows:
        assert int(addr, 16) >> 63 and int(size) > 0 and kind == "func"
    assert "KASLR slide" in result.stderr
    none = qprobes_cli("symbols", "no_such_symbol_*")
    assert none.returncode == 1 and none.stdout == ""
