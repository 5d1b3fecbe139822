"""Hist triggers: qprobes' histograms against the guest's own, in one VM and run.

The same definitions go to the guest's kprobe_events (with the guest's own
hist triggers) and to qprobes; one workload runs; the guest's ``hist``
files and qprobes' tables must have the same trigger lines, the same entry
lines (the order of entries whose counts tie is the kernel's sort's, so
entries are compared as sets) and the same totals.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from qprobes.frontends.session import Session
from qprobes.tracing import Tracer

pytestmark = pytest.mark.vm

TR = "/sys/kernel/tracing"
# The shell's own opens (redirections, tracefs) and the cat that reads the
# hist files are left out by the triggers' own filter, on both sides.
NOT_US = 'comm != "cat" && comm != "sh"'
OPEN = "do_sys_openat2 path=+0(%si):string dfd=%di:s32 flags=%dx"
RET = "do_sys_openat2 ret=$retval"
TRIGGERS = {
    "open": [
        "hist:keys=common_pid.execname,path:vals=hitcount,flags:sort=hitcount.descending"
        f" if {NOT_US}",
        f"hist:keys=dfd.log2 if {NOT_US}",
    ],
    "ret": [f"hist:keys=ret.hex:vals=hitcount if {NOT_US}"],
}
WORKLOAD = (
    "head -c 5 /etc/hostname >/dev/null; wc -l /etc/passwd >/dev/null; "
    "head /nonexistent 2>/dev/null; ls / >/dev/null; wc /proc/version >/dev/null; "
    "head -c 5 /etc/hostname >/dev/null"
)


def sections(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """A ``hist`` file's histograms by trigger (without ``[active]``/``[paused]``):
    (sorted entry lines, totals lines)."""
    found = {}
    for chunk in text.split("# event histogram")[1:]:
        info = re.search(r"^# trigger info: (.*?) \[(?:active|paused)\]$", chunk, re.M)
        assert info, chunk
        entries = sorted(line.rstrip() for line in chunk.splitlines() if line.startswith("{ "))
        totals = [line.strip() for line in chunk.splitlines()
                  if line.strip().startswith(("Hits:", "Entries:", "Dropped:"))]  # fmt: skip
        found[info.group(1)] = (entries, totals)
    return found


def test_the_same_histograms_as_the_guests_hist_triggers(linux: Session) -> None:
    tracer = Tracer(linux, lambda event: None)
    setup = [f"echo 'p:qpk/open {OPEN}' >> {TR}/kprobe_events",
             f"echo 'r:qpk/ret {RET}' >> {TR}/kprobe_events"]  # fmt: skip
    for event, triggers in TRIGGERS.items():
        setup += [f"echo '{t}' >> {TR}/events/qpk/{event}/trigger" for t in triggers]
    ours = {
        "open": tracer.add(f"p:qp/open {OPEN}", triggers=TRIGGERS["open"]),
        "ret": tracer.add(f"r:qp/ret {RET}", triggers=TRIGGERS["ret"]),
    }
    try:
        out = linux.command(" && ".join(setup) + " && echo configured")
        assert "configured" in out, out
        linux.command(WORKLOAD, timeout=120)
        theirs = {e: linux.command(f"cat {TR}/events/qpk/{e}/hist") for e in TRIGGERS}
    finally:
        for name in list(tracer.probes):  # first: the clean-up's own opens go uncounted
            tracer.remove(name)
        linux.command(
            f"for e in {TR}/events/qpk/*/trigger; do "
            f"sed 's/ \\[active\\]$//; s/^/!/' $e | while read t; do echo \"$t\" >> $e; done; "
            f"done; echo > {TR}/kprobe_events"
        )
    compared = 0
    for event, tp in ours.items():
        guest = sections(theirs[event])
        assert len(guest) == len(TRIGGERS[event]), theirs[event]
        for hist in tp.hists:
            text = hist.format()
            mine = sections(text)
            assert list(mine) == [hist.spec.describe()]
            ((entries, totals),) = mine.values()
            assert hist.spec.describe() in guest, (hist.spec.describe(), list(guest))
            g_entries, g_totals = guest[hist.spec.describe()]
            assert entries, f"the workload gave {event} no entries: {text}"
            assert entries == g_entries, f"\nqprobes:\n{text}\nguest:\n{theirs[event]}"
            assert totals == g_totals
            compared += len(entries)
    print(f"hist triggers agree on {compared} entries")
    by_path = ours["open"].hists[0].counts()
    assert sum(n for (pid, path), n in by_path.items() if path == "/etc/hostname") == 2
    assert ours["ret"].hists[0][-2] == 1  # head /nonexistent: -ENOENT


def test_cli_prints_hist_tables_at_the_end() -> None:
    trigger = "myopen:hist:keys=common_pid.execname,path:sort=hitcount.descending"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qprobes.frontends.cli",
            "trace",
            "-q",
            "p:myopen do_sys_openat2 path=+0(%si):string",
            "--trigger",
            trigger,
            "--trigger",
            'myopen:hist:keys=path if path ~ "/etc/*"',
            "--",
            "cat /etc/hostname; cat /etc/hostname /etc/hostname",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "myopen:" not in out  # -q: no event lines
    assert out.count("# event histogram") == 2
    assert "# trigger info: hist:keys=common_pid.execname,path:vals=hitcount:" \
           "sort=hitcount.descending:size=2048 [active]" in out  # fmt: skip
    etc = out.split("# event histogram")[2]
    assert re.search(r"^\{ path: /etc/hostname +\} hitcount: +3$", etc, re.M), out
    assert "Entries: 1" in etc
    assert re.search(r"^\{ common_pid: cat +\[ *\d+\], path: /etc/hostname +\} hitcount: +2$",
                     out, re.M), out  # fmt: skip


def test_cli_refuses_a_bad_trigger_before_booting() -> None:
    cases = [
        (["--trigger", "nosuch:hist:keys=path"], "no probe defines event 'nosuch'"),
        (["--trigger", "myopen:hist:keys=path.hex"], "Invalid field modifier"),
        (["--trigger", "myopen:traceoff"], "qprobes runs hist and stacktrace triggers"),
        (["--trigger", "myopen:stacktrace:0"], "stacktrace:COUNT wants a positive count"),
        (["--trigger", "myopen:hist:keys=stacktrace.hex"], "Invalid field modifier"),
    ]
    for extra, message in cases:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "qprobes.frontends.cli",
                "trace",
                "p:myopen do_sys_openat2 path=+0(%si):string",
                *extra,
                "--",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode in (1, 2), (extra, proc.returncode, proc.stderr)
        assert message in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "booting" not in proc.stderr.lower()
