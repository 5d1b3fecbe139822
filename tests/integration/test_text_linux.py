"""Where qprobes refuses to write on the default Linux guest: not kernel text,
Linux's kprobe blacklist, text the kernel rewrites (static keys, static
calls, BUG sites, trampolines, freed init text, its own optimized kprobes),
and while the guest patches its text (text_mutex held).

Each refusal must be one clear line raised before anything is written: the
kernel text is compared byte for byte before and after, and every write
path to the guest is counted. Sites are found in the guest's own tables
(``__jump_table``, ``static_call_sites``, ``__bug_table``) and checked
against the bytes at them; the blacklist against the guest's
``/sys/kernel/debug/kprobes/blacklist``. Run with ``-s`` for the numbers.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import ProbeError
from qprobes.frontends.session import Session
from qprobes.linux.text import (
    KernelText,
    bug_entry_layout,
    jump_layout,
    parse_bug_entries,
    parse_jump_entries,
    parse_static_call_sites,
    static_call_layout,
)
from qprobes.probes.kprobe import Kprobe

pytestmark = pytest.mark.vm

NOP5 = bytes.fromhex("0f1f440000")


def kernel_text(s: Session) -> KernelText:
    assert s.text is not None and s.kernel is not None
    return s.text


def sym(s: Session, name: str) -> int:
    assert s.symbols is not None
    return s.symbols.address(name)


def text_digest(s: Session) -> str:
    start, end = sym(s, "_stext"), sym(s, "_etext")
    return hashlib.sha256(s.engine.read_data(start, end - start)).hexdigest()


def table(s: Session, first: str, last: str) -> tuple[int, bytes]:
    start, stop = sym(s, first), sym(s, last)
    return start, s.engine.read_data(start, stop - start)


def in_text(s: Session, addr: int) -> bool:
    return sym(s, "_stext") <= addr < sym(s, "_etext")


def boundaries(s: Session, name: str) -> list[int]:
    """Instruction offsets of a function (decoded from its start)."""
    assert s.symbols is not None
    f = s.symbols.lookup(name)
    code = s.engine.read_data(f.addr, f.size)
    out, pos = [], 0
    while pos < f.size:
        out.append(pos)
        pos += x86insn.decode(code[pos:], f.addr + pos).length
    return out


@pytest.fixture
def writes(linux: Session, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every write qprobes makes to the guest while the test runs."""
    seen: list[str] = []

    def counting(obj: Any, name: str) -> None:
        real: Callable[..., Any] = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.append(f"{name}({args[0]:#x})")
            return real(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)

    counting(linux.target, "write")
    counting(linux.target, "write_phys")
    if linux.hostmem is not None:
        counting(linux.hostmem, "write_virt")
        counting(linux.hostmem, "write_phys")
    return seen


def probe(s: Session, where: str | int) -> Kprobe:
    """Register a kprobe with a pre_handler that does nothing."""
    kp: Kprobe = s.kprobe(where, lambda kp, ctx: False)
    return kp


def refused(action: Callable[[], object]) -> str:
    with pytest.raises(ProbeError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_tables_are_read(linux: Session) -> None:
    stats = kernel_text(linux).stats
    print(f"\nread {stats.jump_entries} jump entries, {stats.static_call_sites} static call "
          f"sites, {stats.bug_entries} bug entries, {stats.smp_lock_sites} SMP lock sites, "
          f"{stats.blacklist} blacklist ranges in {stats.seconds:.3f} s")  # fmt: skip
    sizes = {
        "jump_entries": ("__start___jump_table", "__stop___jump_table", "jump_entry"),
        "static_call_sites": (
            "__start_static_call_sites", "__stop_static_call_sites", "static_call_site"
        ),
        "bug_entries": ("__start___bug_table", "__stop___bug_table", "bug_entry"),
    }
    btf = linux.kernel.btf if linux.kernel is not None else None
    assert btf is not None
    for attr, (first, last, struct_name) in sizes.items():
        size = btf.sizeof(btf.find_struct(struct_name).id)
        assert getattr(stats, attr) == (sym(linux, last) - sym(linux, first)) // size > 1000


def test_blacklist_is_the_guests_own(linux: Session) -> None:
    """Every entry of /sys/kernel/debug/kprobes/blacklist, in its order."""
    assert linux.kernel is not None
    ours = linux.kernel.nokprobe_list(linux.engine.read_data)
    out = linux.command("cat /sys/kernel/debug/kprobes/blacklist")
    theirs = [(int(a, 16), int(b, 16), name) for a, b, name in
              re.findall(r"^0x([0-9a-f]+)-0x([0-9a-f]+)\s+(\S+)", out, re.M)]  # fmt: skip
    print(f"\nblacklist: {len(ours)} entries (the guest lists {len(theirs)})")
    assert len(ours) > 300
    assert [(a, b) for a, b, _ in ours] == [(a, b) for a, b, _ in theirs]
    names = {name for _, _, name in theirs}
    assert {"kprobe_int3_handler", "do_int3"} <= names


def test_refusals_are_one_line_and_write_nothing(linux: Session, writes: list[str]) -> None:
    assert linux.symbols is not None
    symbols = linux.symbols
    text = kernel_text(linux)
    # A static-key site in update_curr, from the guest's own __jump_table.
    start, data = table(linux, "__start___jump_table", "__stop___jump_table")
    assert linux.kernel is not None and linux.kernel.btf is not None
    btf = linux.kernel.btf
    update_curr = symbols.lookup("update_curr")
    jumps = [e for e in parse_jump_entries(data, start, jump_layout(btf)) if e.code in update_curr]
    assert jumps, "update_curr has no static-key site"
    jump = next(e for e in jumps if symbols.format(e.key) == "sched_schedstats")
    site = linux.engine.read_data(jump.code, 5)  # a 2- or 5-byte nop or jmp
    assert site[:2] == b"\x66\x90" or site[:1] in (b"\xeb", b"\xe9") or site == NOP5, site.hex()
    # A static call site in kernel text (a live call rel32).
    start, data = table(linux, "__start_static_call_sites", "__stop_static_call_sites")
    every = parse_static_call_sites(data, start, static_call_layout(btf))
    read = linux.engine.read_data
    calls = [c for c in every if in_text(linux, c.addr) and read(c.addr, 1) == b"\xe8"]
    call = calls[len(calls) // 2]
    # A BUG()/WARN() site: its ud2.
    start, data = table(linux, "__start___bug_table", "__stop___bug_table")
    bugs = [a for a in parse_bug_entries(data, start, bug_entry_layout(btf)) if in_text(linux, a)]
    bug = bugs[len(bugs) // 2]
    assert linux.engine.read_data(bug, 2) == b"\x0f\x0b"
    trampoline = sym(linux, "__static_call_text_start")
    trampoline = next(s.addr for s in symbols.all_symbols()
                      if s.addr >= trampoline and s.name.startswith("__SCT__"))  # fmt: skip
    cases: list[tuple[str, Callable[[], object], str]] = [
        ("user address", lambda: probe(linux, 0x401000), "0x401000 is a user-space address"),
        ("data", lambda: probe(linux, "jiffies_64"), "jiffies_64 .*is not kernel text"),
        ("blacklist", lambda: probe(linux, "kprobe_int3_handler"),
         "kprobe_int3_handler is blacklisted"),
        ("blacklist", lambda: probe(linux, "do_int3"), "do_int3 is blacklisted"),
        ("static key", lambda: probe(linux, jump.code),
         rf"{re.escape(symbols.format(jump.code))} .*static-key jump site .*sched_schedstats"),
        ("static call", lambda: probe(linux, call.addr),
         rf"{re.escape(symbols.format(call.addr))} .*static call site"),
        ("BUG site", lambda: probe(linux, bug), r"BUG\(\)/WARN\(\) site"),
        ("trampoline", lambda: probe(linux, trampoline), "static call trampoline"),
        ("past the end", lambda: probe(linux, f"update_curr+{update_curr.size:#x}"),
         rf"update_curr\+{update_curr.size:#x} is outside update_curr, which is "
         rf"{update_curr.size:#x} bytes long"),
        ("freed init", lambda: probe(linux, "console_init"),
         r"\.init\.text, which the kernel freed"),
        ("kretprobe entry",
         lambda: linux.kretprobe(sym(linux, "do_sys_openat2") + 5, lambda rp, ctx: None),
         r"return probe must be at a function's entry: .* do_sys_openat2\+0x5"),
    ]  # fmt: skip
    before = text_digest(linux)
    variable = linux.engine.read_data(sym(linux, "jiffies_64"), 8)
    for what, action, pattern in cases:
        message = refused(action)
        print(f"\n{what}: {message}")
        assert re.search(pattern, message), (what, message)
    assert writes == []
    assert not linux.engine.points
    assert text_digest(linux) == before
    assert linux.engine.read_data(sym(linux, "jiffies_64"), 8) == variable
    assert text.text_mutex_held() is False


def test_a_probe_on_plain_code_still_arms_and_hits(linux: Session) -> None:
    addr = sym(linux, "do_sys_openat2") + boundaries(linux, "do_sys_openat2")[1]
    kp = probe(linux, addr)
    try:
        linux.command("cat /etc/hostname")
        assert kp.nhit >= 1
    finally:
        linux.unregister(kp)


def test_inside_the_guests_own_optimized_kprobe(linux: Session, writes: list[str]) -> None:
    offsets = boundaries(linux, "vfs_read")
    at = offsets[3]  # past the ftrace site and the frame setup: optimizable
    assert linux.symbols is not None
    vfs_read = linux.symbols.lookup("vfs_read")
    original = linux.engine.read_data(vfs_read.addr, vfs_read.size)
    tracing = "/sys/kernel/tracing"
    linux.command(f"echo 'p:inner vfs_read+{at:#x}' > {tracing}/kprobe_events && "
                  f"echo 1 > {tracing}/events/kprobes/inner/enable")  # fmt: skip
    try:
        linux.run(timeout=1.0)  # the optimizer runs delayed (OPTIMIZE_DELAY)
        listed = linux.command("cat /sys/kernel/debug/kprobes/list")
        assert f"vfs_read+{at:#x}" in listed and "[OPTIMIZED]" in listed, listed
        base = sym(linux, "vfs_read")
        optimized = kernel_text(linux).optimized_kprobes()
        assert [a for a, _ in optimized] == [base + at]
        size = optimized[0][1]
        assert 5 <= size <= 5 + 15
        # The guest's jump is in its text; qprobes decodes what it hides.
        assert linux.engine.read_data(base + at, 1) == b"\xe9"
        assert linux.engine._original_bytes(vfs_read.addr, vfs_read.size) == original
        inside = [o for o in offsets if at <= o < at + size]
        before = text_digest(linux)
        writes.clear()
        for off in inside:
            message = refused(lambda off=off: probe(linux, base + off))  # type: ignore[misc]
            print(f"\nvfs_read+{off:#x}: {message}")
            assert "optimized kprobe at vfs_read+" in message
        assert writes == [] and text_digest(linux) == before
        after = next(o for o in offsets if o >= at + size)
        kp = probe(linux, base + after)  # just past the guest's jump: fine
        linux.unregister(kp)
    finally:
        linux.command(f"echo 0 > {tracing}/events/kprobes/inner/enable; "
                      f"echo > {tracing}/kprobe_events")  # fmt: skip


def test_waits_while_the_guest_patches_its_text(linux: Session,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's kprobe optimizer holds text_mutex while it unoptimizes a
    probe (across a synchronize_rcu_tasks()): a qprobes probe registered
    then waits for it, running the guest, and arms once it is free."""
    text = kernel_text(linux)
    offsets = boundaries(linux, "vfs_read")
    tracing = "/sys/kernel/tracing"
    linux.command(f"echo 'p:patch vfs_read+{offsets[3]:#x}' > {tracing}/kprobe_events && "
                  f"echo 1 > {tracing}/events/kprobes/patch/enable")  # fmt: skip
    linux.run(timeout=1.0)
    assert "[OPTIMIZED]" in linux.command("cat /sys/kernel/debug/kprobes/list")
    linux.command(f"echo 0 > {tracing}/events/kprobes/patch/enable; echo > {tracing}/kprobe_events")
    linux.run(until=text.text_mutex_held, timeout=5.0)
    assert text.text_mutex_held(), "the guest's optimizer never took text_mutex"
    seen: list[bool] = []

    def held() -> bool:
        seen.append(text.text_mutex_held())
        return seen[-1]

    monkeypatch.setattr(linux.engine, "text_lock_held", held)
    addr = sym(linux, "do_sys_openat2") + boundaries(linux, "do_sys_openat2")[1]
    kp = probe(linux, addr)
    try:
        print(f"\ntext_mutex seen held {seen.count(True)} times before arming")
        assert seen[0] and not seen[-1]
        assert linux.engine.read_data(addr, 1) == b"\xcc"
        linux.command("cat /etc/hostname")
        assert kp.nhit >= 1
    finally:
        linux.unregister(kp)


def test_text_mutex_held_delays_then_refuses(linux: Session, writes: list[str]) -> None:
    """While text_mutex has an owner no int3 is written: qprobes runs the
    guest and retries, then gives up with one line. The owner is faked
    (init_task, which idles) for the test and cleared afterwards."""
    assert linux.kernel is not None and linux.kernel.btf is not None
    owner_off, _ = linux.kernel.btf.struct_member_offset("mutex", "owner")
    owner = sym(linux, "text_mutex") + owner_off
    text = kernel_text(linux)
    linux.run(until=lambda: not text.text_mutex_held(), timeout=30)
    assert struct.unpack("<Q", linux.engine.read_data(owner, 8)) == (0,)
    addr = sym(linux, "do_sys_openat2") + boundaries(linux, "do_sys_openat2")[1]
    byte = linux.engine.read_data(addr, 1)
    old_timeout = linux.engine.text_lock_timeout
    linux.engine.text_lock_timeout = 0.3
    linux.engine.write_data(owner, struct.pack("<Q", sym(linux, "init_task")))
    try:
        assert kernel_text(linux).text_mutex_held()
        writes.clear()
        message = refused(lambda: probe(linux, addr))
        print(f"\ntext_mutex: {message}")
        assert "text_mutex held" in message
        assert writes == [] and not linux.engine.points
        assert linux.engine.read_data(addr, 1) == byte
    finally:
        linux.engine.write_data(owner, struct.pack("<Q", 0))
        linux.engine.text_lock_timeout = old_timeout
    kp = probe(linux, addr)
    assert linux.engine.read_data(addr, 1) == b"\xcc"
    linux.unregister(kp)
    assert linux.engine.read_data(addr, 1) == byte


def test_cli_refuses_a_user_address_in_one_line() -> None:
    run = subprocess.run([sys.executable, "-m", "qprobes.frontends.cli", "trace", "p:x 0x401000",
                          "--", "cat /etc/hostname"],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert run.returncode != 0
    lines = run.stderr.strip("\n").splitlines()
    assert len(lines) == 1, run.stderr
    assert "0x401000" in lines[0] and "not kernel text" in lines[0]
    assert "qprobes-guest" not in run.stdout  # the command never ran
