"""Kernel stack traces from the guest's ORC tables, against the guest's own
``stacktrace`` trigger on the same function in the same run."""

from __future__ import annotations

import re

import pytest

from qprobes.frontends.session import Session
from qprobes.tracing import TraceEvent, Tracer

pytestmark = pytest.mark.vm

TR = "/sys/kernel/tracing"
CAT = 'comm == "cat"'


def guest_stacks(trace: str) -> list[tuple[int, list[str]]]:
    """(pid, frames) of each ``<stack trace>`` entry in a ``trace`` file."""
    found: list[tuple[int, list[str]]] = []
    for line in trace.splitlines():
        head = re.match(r"\s*\S+-(\d+)\s+\[\d+\].*<stack trace>", line)
        if head:
            found.append((int(head.group(1)), []))
        elif line.startswith(" => ") and found:
            found[-1][1].append(line[4:].strip())
    return found


def from_function(frames: list[str], name: str) -> list[str]:
    """The frames from ``name`` (the probed function) down to the entry."""
    assert name in frames, frames
    return frames[frames.index(name) :]


def test_stacks_match_the_guests_stacktrace_trigger(linux: Session) -> None:
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    functions = ["do_sys_openat2", "vfs_read"]
    setup = []
    for i, name in enumerate(functions):
        setup += [f"echo 'p:qps/f{i} {name}' >> {TR}/kprobe_events",
                  f"echo 'stacktrace if {CAT}' > {TR}/events/qps/f{i}/trigger"]  # fmt: skip
        tracer.add(f"p:qp/f{i} {name}", triggers=[f"stacktrace if {CAT}"])
    try:
        out = linux.command(
            f"echo > {TR}/trace && " + " && ".join(setup) + f" && echo 1 > {TR}/events/qps/enable"
            " && echo configured"
        )
        assert "configured" in out, out
        linux.command("cat /etc/hostname > /dev/null; cat /proc/version > /dev/null")
        linux.command(f"echo 0 > {TR}/events/qps/enable")
        trace = linux.command(f"cat {TR}/trace", timeout=120)
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
        linux.command(f"echo 0 > {TR}/events/qps/enable; "
                      f"for e in {TR}/events/qps/*/trigger; do echo '!stacktrace' > $e; done; "
                      f"echo > {TR}/kprobe_events")  # fmt: skip
    theirs = guest_stacks(trace)
    ours = [(e.pid, e) for e in events if e.show_stack]
    assert ours and len(ours) == len(theirs), (len(ours), len(theirs), trace[-3000:])
    for (pid, frames), (our_pid, event) in zip(theirs, ours, strict=True):
        name = functions[int(event.event[1:])]
        mine = [s.split("+")[0] for s in event.stack_syms]
        assert pid == our_pid
        assert mine == from_function(frames, name), (mine, frames)
    opens = [e for _, e in ours if e.event == "f0"]
    names = [s.split("+")[0] for s in opens[0].stack_syms]
    assert names == ["do_sys_openat2", "__x64_sys_openat", "do_syscall_64",
                     "entry_SYSCALL_64_after_hwframe"]  # fmt: skip
    text = opens[0].format().splitlines()
    assert text[1].endswith("<stack trace>") and text[2:] == [f" => {n}" for n in names]
    assert opens[0].as_json()["stack"][0] == opens[0].stack_syms[0]


def test_return_addresses_behind_trampolines_are_the_real_ones(linux: Session) -> None:
    """A qprobes return probe on the caller puts its trampoline on the
    stack; the unwinder shows the real caller, and a return probe's own
    stack starts where the function returned to."""
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    tracer.add("r:qp/outer __x64_sys_openat")
    tracer.add("p:qp/inner do_sys_openat2", triggers=[f"stacktrace if {CAT}"])
    tracer.add("r:qp/back do_sys_openat2", triggers=[f"stacktrace if {CAT}"])
    tracer.add("p:qp/count do_sys_openat2", triggers=['hist:keys=stacktrace if comm == "cat"'])
    try:
        linux.command("cat /etc/hostname > /dev/null")
    finally:
        for name in list(tracer.probes):
            hists = tracer.probes[name].hists
            tracer.remove(name)
    inner = [e for e in events if e.event == "inner" and e.show_stack]
    back = [e for e in events if e.event == "back" and e.show_stack]
    assert inner and back
    trampoline = linux.kretprobes.trampoline
    for e in inner:
        assert e.stack is not None and trampoline not in e.stack
        assert [s.split("+")[0] for s in e.stack_syms][:3] == [
            "do_sys_openat2", "__x64_sys_openat", "do_syscall_64"]  # fmt: skip
    for e in back:
        assert [s.split("+")[0] for s in e.stack_syms][:2] == ["__x64_sys_openat", "do_syscall_64"]
    (hist,) = hists
    (key,) = list(hist)
    (frames,) = key
    assert hist[key] == len(inner)
    text = hist.format()
    assert "{ stacktrace:\n" in text and "         do_sys_openat2+0x0/" in text, text
    assert f"{frames[0]:#x}" not in text  # symbolised


def test_unwinding_through_an_ftrace_trampoline(linux: Session) -> None:
    """The guest's own kprobe on vfs_read runs from an ftrace trampoline
    (allocated code with no ORC data); a qprobes probe in the ring buffer
    below it unwinds through the trampoline (as the code it was copied
    from) to vfs_read and the syscall entry."""
    events: list[TraceEvent] = []
    tracer = Tracer(linux, events.append)
    try:
        out = linux.command(f"echo 'p:qpt/vr vfs_read' >> {TR}/kprobe_events && "
                            f"echo 1 > {TR}/events/qpt/vr/enable && echo ok")  # fmt: skip
        assert "ok" in out
        tracer.add("p:qp/rb ring_buffer_lock_reserve", triggers=['stacktrace if comm == "head"'])
        linux.command("head -c 5 /etc/hostname > /dev/null")
    finally:
        for name in list(tracer.probes):
            tracer.remove(name)
        linux.command(f"echo 0 > {TR}/events/qpt/vr/enable; echo > {TR}/kprobe_events")
    shown = [e for e in events if e.show_stack]
    assert shown
    names = [s.split("+")[0] for s in shown[0].stack_syms]
    assert "kprobe_ftrace_handler" in names, names
    after = names[names.index("kprobe_ftrace_handler") + 1 :]
    assert after[0].startswith("0x")  # the trampoline: not a kallsyms symbol
    assert after[1:] == ["vfs_read", "ksys_read", "do_syscall_64", "entry_SYSCALL_64_after_hwframe"]
