"""The ``qprobes`` command line. Each subcommand parses, then calls one API function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from qprobes import __version__
from qprobes.errors import ProbeSyntaxError, QprobesError


def _cmd_qtest(args: argparse.Namespace) -> int:
    from qprobes.frontends import api

    if args.no_probes:
        return api.qtest_selfcheck(
            loops=args.loops, smp=args.smp, accel=args.accel, cpu=args.cpu, out=sys.stdout
        )
    return api.qtest_probe_all(
        rounds=args.loops, smp=args.smp, accel=args.accel, cpu=args.cpu, out=sys.stdout
    )


def _cmd_boot(args: argparse.Namespace) -> int:
    from qprobes.frontends import api

    return api.boot_interactive(
        kernel=args.kernel, initrd=args.initrd, append=args.append, smp=args.smp,
        memory_mib=args.memory, accel=args.accel, cpu=args.cpu, qtest=args.qtest,
        kaslr=args.kaslr,
    )  # fmt: skip


def _machine_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "kernel": args.kernel, "initrd": args.initrd, "append": args.append,
        "attach_address": args.attach, "reserve": args.reserve, "kaslr": args.kaslr,
        "smp": args.smp, "accel": args.accel, "cpu": args.cpu, "symbols_file": args.symbols,
        "memory_mib": args.memory, "watchdog": not args.no_watchdog,
        "guest_memory": args.guest_memory,
    }  # fmt: skip


def _cmd_trace(args: argparse.Namespace) -> int:
    from qprobes.frontends import api

    if not args.probes and not args.latency:
        raise SystemExit("qprobes trace: give at least one probe definition or --latency FUNCTION")
    return api.trace(
        args.probes, args.guest_command, json_output=args.json, filters=args.filter,
        triggers=args.trigger, quiet=args.quiet, latency=args.latency, output=args.output,
        output_format=args.format, duration=args.duration, fast=args.fast,
        gdb_listen=args.gdb_listen, detour=not args.no_detour,
        **_machine_args(args),
    )  # fmt: skip


def _cmd_symbols(args: argparse.Namespace) -> int:
    from qprobes.frontends import api

    return api.symbols(args.pattern, **_machine_args(args))


def _cmd_completion(args: argparse.Namespace) -> int:
    from qprobes.frontends.completion import bash_completion

    print(bash_completion(build_parser()), end="")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from qprobes.frontends.bench import BenchOptions, bench

    changes = {k: getattr(args, k) for k in ("repeat", "hits", "gdb_hits", "pairs")
               if getattr(args, k)}  # fmt: skip
    if args.gdb:
        changes["gdb"] = args.gdb
    opts = BenchOptions.quick_run(**changes) if args.quick else BenchOptions(**changes)
    return bench(opts, json_output=args.json, out=sys.stdout)


def _cmd_attach(args: argparse.Namespace) -> int:
    from qprobes.frontends import api

    if args.recover:
        if args.reserve is None:
            raise SystemExit("qprobes attach --recover needs --reserve START:SIZE, the memory "
                             "the dead session used")  # fmt: skip
        return api.recover(args.address, api._parse_reserve(args.reserve), out=sys.stdout,
                           force=args.force)  # fmt: skip
    return api.attach_info(args.address, out=sys.stdout)


TRACE_EPILOG = """\
probe definitions (Linux's Documentation/trace/kprobetrace.rst):
  p[:[GRP/]EVENT] SYM[+OFFS]|ADDR [FETCHARGS]   a probe at an instruction
  r[MAXACTIVE][:[GRP/]EVENT] SYM[+0] [FETCHARGS] a probe at a function's return
  -:[GRP/]EVENT                                remove an event defined earlier

fetch arguments, each [NAME=]FETCHARG[:TYPE]:
  %REG          a register (%di, %si, %ax, ...)
  @ADDR @SYM[+|-OFFS]  memory at an address or symbol
  $stackN $stack       the Nth stack entry, the stack pointer
  $argN         the Nth function argument (at a function's entry)
  $retval       the return value (return probes)
  $comm         the current task's name
  +|-[u]OFFS(FETCHARG)  memory at FETCHARG+OFFS (u: user memory)
  $argN->MEMBER[.MEMBER]  struct members, with the kernel's BTF types
TYPE: u8..u64, s8..s64, x8..x64, string, ustring, symbol, b<bits>@<bit>/<size>,
      TYPE[N] for arrays

exit status:
  the guest command's own status, when -- GUEST_COMMAND ran to its end
  0    tracing ended with no guest command
  1    an error (one "qprobes: error:" line), or the guest died mid-trace (a
       panic, QEMU killed: that line, the end of its console, the summary)
  2    bad usage, or a bad probe definition or filter
  124  --duration ended the guest command
  129  SIGHUP (the terminal closed), after detaching and printing the summary
  130  SIGINT (Ctrl-C), after detaching and printing the summary
  143  SIGTERM, after detaching and printing the summary
  141  stdout was closed (| head)
  A second signal while qprobes detaches says "detaching, please wait" and, like
  every later one, is ignored: the detach always finishes. Only SIGKILL ends
  qprobes at once; in a guest it attached to, its watchdog then puts the guest
  back (one line in $TMPDIR/qprobes-*/watchdog.log), or, with the watchdog gone
  too, 'qprobes attach ADDR --recover --reserve START:SIZE' does.

hist triggers (Linux's Documentation/trace/histogram.rst), --trigger EVENT:TRIGGER:
  hist:keys=KEY[.MOD][,KEY...][:vals=VAL[.hex],...][:sort=FIELD[.descending],...]
      [:size=N] [if FILTER]
  KEY: a fetch arg, common_pid, common_cpu (cpu), comm; MOD: hex, sym, sym-offset,
  execname (common_pid), syscall, log2, buckets=N. Printed at the end (and after
  Ctrl-C) as the kernel's hist file; --json gives one {"hist": ...} object each.
  stacktrace as a key: the kernel stack (unwound from the guest's ORC tables).
stacktrace triggers, --trigger EVENT:stacktrace[:COUNT] [if FILTER]:
  each event is followed by the kernel's <stack trace> block (--json: "stack").

examples:
  qprobes trace 'p:myopen do_sys_openat2 path=+0(%si):string' -- cat /etc/hostname
  qprobes trace -q 'p:myopen do_sys_openat2 path=+0(%si):string' \
      --trigger 'myopen:hist:keys=common_pid.execname,path:sort=hitcount.descending' -- ls /
  qprobes trace 'r:ret do_sys_openat2 $retval' --filter 'ret:comm == "cat"' -- cat /etc/hostname
  qprobes trace --smp 2 --duration 10 'p:alloc kmem_cache_alloc size=+24(%di):u32'
"""

#: Arguments that start with "-:" are kprobe_events removals, not options.
_REMOVAL = "\0remove:"


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qprobes",
        description="Linux-style kprobes for QEMU guests, run from the host through the gdbstub.",
    )
    parser.add_argument("--version", action="version", version=f"qprobes {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def machine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--smp", type=_positive_int, default=1,
                       help="number of vCPUs (default 1)")  # fmt: skip
        p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                       help="QEMU accelerator (default tcg)")  # fmt: skip
        p.add_argument("--cpu", default=None, help="QEMU -cpu model (default: QEMU's)")

    p = sub.add_parser(
        "qtest",
        help="boot the built-in qtest kernel, probe every instruction of its targets, "
        "and run its self-check",
        description="Boot qtest, the freestanding test kernel built into qprobes, put a kprobe "
        "on every instruction of its target functions (half boosted, half single-stepped), "
        "run its self-check with them armed, print hits per target, detach, and check that "
        "its text, IDT and page tables are as before. Exit status 0 when all of that held.",
    )
    p.add_argument("--loops", type=int, default=1, help="self-check rounds (default 1)")
    p.add_argument("--no-probes", action="store_true",
                   help="run the self-check with no probes (just boot and attach)")  # fmt: skip
    machine_options(p)
    p.set_defaults(func=_cmd_qtest)

    def guest_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kernel", help="kernel image (default: the built-in Linux guest)")
        p.add_argument("--initrd", help="initial ramdisk (default: the built-in initramfs)")
        p.add_argument("--append", default="", help="extra kernel command line")
        p.add_argument("--memory", type=_positive_int, default=None, metavar="MIB",
                       help="guest RAM in MiB (default 512)")  # fmt: skip
        p.add_argument("--kaslr", action="store_true", help="boot with KASLR (default nokaslr)")
        p.add_argument(
            "--symbols",
            metavar="FILE",
            help="a System.map or vmlinux instead of the kernel's own kallsyms",
        )
        machine_options(p)

    def attach_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--attach",
            metavar="ADDR",
            help="attach to a running QEMU's gdbstub (HOST:PORT or socket path)",
        )
        p.add_argument(
            "--reserve",
            metavar="START:SIZE",
            help="with --attach: guest-physical memory the guest does not use",
        )
        p.add_argument(
            "--guest-memory",
            metavar="FILE",
            help="with --attach: the file QEMU shares the guest's RAM in (memory-backend-file "
            "mem-path, share=on); the fast path then drains while the guest runs. Without it, "
            "a QEMU on this host is read through /proc/PID/mem when allowed, else the rings "
            "are drained by short stops",
        )
        p.add_argument(
            "--no-watchdog",
            action="store_true",
            help="with --attach: start no watchdog (a process that puts the guest back if "
            "qprobes is killed); 'qprobes attach ADDR --recover' is then the way back",
        )

    p = sub.add_parser(
        "trace",
        usage="qprobes trace [options] PROBE... [-- GUEST_COMMAND...]",
        help="trace kprobe_events-style probes in a Linux guest",
        description="Boot the default Linux guest (or --kernel, or --attach), arm the probes, "
        "run GUEST_COMMAND in its shell (or trace until Ctrl-C), print every hit "
        "in ftrace's format (or JSON), then a summary of hits and misses.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRACE_EPILOG,
    )
    p.add_argument(
        "probes",
        nargs="*",
        metavar="PROBE",
        help="p[:[GRP/]EVENT] SYM[+OFFS]|ADDR [FETCHARGS], r[MAXACTIVE][:[GRP/]EVENT] SYM "
        "[FETCHARGS], or -:[GRP/]EVENT to remove one defined before it (see below)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.add_argument(
        "--filter",
        action="append",
        metavar="EVENT:EXPR",
        help="ftrace filter for one event, e.g. 'myopen:path ~ \"/etc/*\"'",
    )
    p.add_argument(
        "--trigger",
        action="append",
        metavar="EVENT:TRIGGER",
        help="an ftrace hist or stacktrace trigger on one event (hist tables print at the "
        "end as the kernel's hist file), e.g. "
        "'myopen:hist:keys=common_pid.execname,path:sort=hitcount.descending'",
    )
    p.add_argument("--latency", action="append", metavar="FUNCTION",
                   help="time each call of FUNCTION from entry to return; print a log2 "
                   "histogram with count, min, mean, max and percentiles at the end")  # fmt: skip
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the events to FILE instead of stdout: ftrace text (.txt), "
                   "NDJSON (.ndjson) or Chrome/Perfetto trace JSON (.chrome.json)")  # fmt: skip
    p.add_argument("--format", choices=("txt", "ndjson", "chrome"),
                   help="the format of -o FILE (default: by its name)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print no event lines (triggers' tables and the summary only)")  # fmt: skip
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="trace this long; with GUEST_COMMAND, stop the command after it "
                   "(exit status 124, as timeout(1))")  # fmt: skip
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=False,
                   help="record kprobe and return probe hits in the guest, with no VM stop "
                   "per hit (arrays and stack traces stay on the slow path; strings keep 255 "
                   "bytes); --no-fast forces the slow path")  # fmt: skip
    p.add_argument("--gdb-listen", metavar="HOST:PORT|unix:PATH",
                   help="serve a GDB remote endpoint there while the probes are armed "
                   "(gdb: target remote ADDRESS): gdb sees the guest as if no probe were "
                   "there, and the probes keep firing while gdb lets the guest run")  # fmt: skip
    p.add_argument("--no-detour", action="store_true",
                   help="with --fast, keep every probe on its int3: no jump-optimized "
                   "detours (by default a probe whose instructions allow it is replaced "
                   "by a jump, so a hit raises no exception)")  # fmt: skip
    guest_options(p)
    attach_options(p)
    p.set_defaults(func=_cmd_trace, guest_command=[])

    p = sub.add_parser(
        "symbols", help="list kernel symbols matching a glob",
        description="Boot the Linux guest (or --attach to one), read its symbols from its own "
        "kallsyms (or --symbols FILE), and print each symbol matching PATTERN: address, size, "
        "kind and name. A kernel image booted before with KASLR off is answered from what "
        "that boot read, with no guest. Exit status 1 when nothing matches.",
    )  # fmt: skip
    p.add_argument("pattern", help="glob, e.g. 'vfs_*'")
    guest_options(p)
    attach_options(p)
    p.set_defaults(func=_cmd_symbols)

    p = sub.add_parser(
        "boot", help="boot a guest and hand over its serial console",
        description="Boot the Linux guest (or qtest, or --kernel) and connect this terminal "
        "to its serial console in raw mode: every key goes to the guest, Ctrl-A x quits. "
        "The gdbstub's socket is printed, for qprobes --attach or gdb. The exit status is "
        "the guest shell's.",
    )  # fmt: skip
    p.add_argument("--qtest", action="store_true", help="boot qtest instead of Linux")
    p.add_argument("--initrd", help="initial ramdisk")
    p.add_argument("--kernel", help="kernel image (default: the built-in Linux guest)")
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--kaslr", action="store_true", help="boot with KASLR")
    p.add_argument("--memory", type=_positive_int, default=512,
                   help="guest RAM in MiB (default 512)")  # fmt: skip
    machine_options(p)
    p.set_defaults(func=_cmd_boot)

    p = sub.add_parser(
        "completion", help="print a shell completion script",
        description='Print a completion script for SHELL: eval "$(qprobes completion bash)" '
        "in ~/.bashrc (zsh: autoload -U bashcompinit && bashcompinit first).",
    )  # fmt: skip
    p.add_argument("shell", choices=("bash", "zsh"))
    p.set_defaults(func=_cmd_completion)

    p = sub.add_parser(
        "attach", help="connect to a running QEMU's gdbstub and describe it",
        description="Connect to the gdbstub of a QEMU started elsewhere (-gdb unix:PATH or "
        "tcp::PORT), print each vCPU's rip, rsp, cr3 and IDT, and detach, leaving it running. "
        "With --recover, undo what a qprobes session that was killed while attached left in "
        "the guest (it keeps a journal of every change in its reserved memory).",
    )  # fmt: skip
    p.add_argument("address", help="HOST:PORT or the path of a unix socket")
    p.add_argument("--recover", action="store_true",
                   help="put back what a qprobes session that died attached left in the "
                   "guest (int3s, return addresses, IDT gates, page tables), from its "
                   "journal")  # fmt: skip
    p.add_argument("--reserve", metavar="START:SIZE",
                   help="with --recover: the memory the dead session was given")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="with --recover: recover even though the session that owns the "
                   "journal may still run (its pid is alive on this host, or it ran on "
                   "another host)")  # fmt: skip
    p.set_defaults(func=_cmd_attach)

    p = sub.add_parser(
        "bench", help="measure what a probe hit costs, against gdb and the guest's kprobes",
        description="Boot the default Linux guest once and time the same workload (qp-open N "
        "/etc/hostname, probes on do_sys_openat2) with no probe, the guest's own "
        "kprobe_events (set up through tracefs), qprobes' boosted and single-stepped kprobes, "
        "kretprobe, Tracer on the slow path and on the fast path (recorders in the guest), "
        "and a real gdb's break + commands on the same QEMU; then arm "
        "1,000 and 10,000 probes, time a mixed workload with 1,000 unhit probes armed, and "
        "compare the boot to the first probe hit with a plain boot. Rows that never stop "
        "the guest are timed by its vCPU threads' CPU time, and those that can be switched "
        "off (the guest's event, the fast entry probes) also in off/on pairs. Progress "
        "goes to stderr; docs/BENCHMARKS.md explains the method.",
    )  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="one JSON object instead of the table")  # fmt: skip
    p.add_argument("-r", "--repeat", type=_positive_int, default=None,
                   help="timed runs per row (default 5; --quick: 3)")  # fmt: skip
    p.add_argument("-n", "--hits", type=_positive_int, default=None,
                   help="opens (probe hits) per run (default 1000; --quick: 300)")  # fmt: skip
    p.add_argument("--pairs", type=_positive_int, default=None,
                   help="off/on pairs per round of the rows that can be switched off "
                   "(default 4; --quick: 2)")  # fmt: skip
    p.add_argument("--gdb-hits", type=_positive_int, default=None,
                   help="opens per run with gdb's breakpoint, about 25-55 ms each "
                   "(default 100; --quick: 10)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a short run (about a minute): fewer runs and hits, no "
                   "10,000-probe arming")  # fmt: skip
    p.add_argument("--gdb", metavar="PATH", default=None,
                   help="the gdb to compare with (default: gdb on PATH)")  # fmt: skip
    p.set_defaults(func=_cmd_bench)
    return parser


def reference_markdown() -> str:
    """docs/commands.md: every command's ``--help``, as one Markdown page."""
    import os

    parser = build_parser()
    # A fixed width, so the page does not depend on the terminal that made it.
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parts = [
            "# qprobes commands\n",
            "Generated from the command line's own definitions "
            "(`python -m qprobes.frontends.cli --reference > docs/commands.md`); "
            "`qprobes COMMAND --help` prints the same.\n",
            "```\n" + parser.format_help() + "```\n",
        ]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    parts.append(f"## qprobes {name}\n\n```\n{sub.format_help()}```\n")
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse a command line: ``-- GUEST_COMMAND...`` and ``-:EVENT`` removals
    are taken out of argparse's way."""
    guest_command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, guest_command = argv[:cut], argv[cut + 1 :]
    # argparse would take "-:EVENT" (a removal) for an option.
    argv = [_REMOVAL + a[1:] if a.startswith("-:") else a for a in argv]
    args = parser.parse_args(argv)
    if hasattr(args, "probes"):
        args.probes = [("-" + p[len(_REMOVAL):]) if p.startswith(_REMOVAL) else p
                       for p in args.probes]  # fmt: skip
    if guest_command:
        if getattr(args, "func", None) is not _cmd_trace:
            parser.error("'-- COMMAND' is only for 'qprobes trace'")
        args.guest_command = guest_command
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--reference"]:  # regenerates docs/commands.md
        print(reference_markdown(), end="")
        return 0
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
    except BrokenPipeError:
        return _broken_pipe()
    except ProbeSyntaxError as exc:
        # One line, then the definition with a caret under the column (as
        # Linux's tracing/error_log shows it).
        print(f"qprobes: error: {exc.message} (column {exc.column + 1})", file=sys.stderr)
        for line in exc.format_caret().splitlines():
            print(f"    {line}", file=sys.stderr)
        return 2
    except QprobesError as exc:
        _say(f"qprobes: error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        # Ctrl-C, or SIGTERM/SIGHUP while a guest of qprobes' own booted
        # (nothing to restore): 128 + the signal, as a shell reports it.
        from qprobes.frontends.signals import Interrupted, exit_status, signal_name

        signum = exc.signum if isinstance(exc, Interrupted) else 2
        _say(f"qprobes: interrupted ({signal_name(signum)})")
        return exit_status(signum)
    return status


def _say(line: str) -> None:
    """One line on stderr, which may be a terminal that hung up (EIO)."""
    from qprobes.frontends.api import silence

    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        silence(sys.stderr)


def _broken_pipe() -> int:
    """stdout's reader went away (``| head``): exit quietly, as grep does."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nothing more reaches the closed pipe
    return 141


def run() -> None:
    """The ``qprobes`` command: :func:`main`, then exit with its status. Once
    a signal has ended a trace, the exit signals stay ignored until the
    process is gone (:func:`~qprobes.frontends.signals.held_until_exit`):
    one that came after the detach would end it by that signal, not 128 +
    the first. :func:`main` called from Python leaves the handlers as they
    were."""
    from qprobes.frontends.signals import held_until_exit

    with held_until_exit():
        status = main()
    sys.exit(status)


if __name__ == "__main__":
    run()
