"""The ``qprobes`` command line. Each subcommand parses, then calls one API function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qprobes import __version__
from qprobes.errors import QprobesError


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
        memory_mib=args.memory, accel=args.accel, cpu=args.cpu,
    )  # fmt: skip


def _cmd_attach(args: argparse.Namespace) -> int:
    from qprobes.frontends import api

    return api.attach_info(args.address, out=sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qprobes",
        description="Linux-style kprobes for QEMU guests, run from the host through the gdbstub.",
    )
    parser.add_argument("--version", action="version", version=f"qprobes {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def machine_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--smp", type=int, default=1, help="number of vCPUs (default 1)")
        p.add_argument("--accel", choices=("tcg", "kvm"), default="tcg",
                       help="QEMU accelerator (default tcg)")  # fmt: skip
        p.add_argument("--cpu", default=None, help="QEMU -cpu model (default: QEMU's)")

    p = sub.add_parser(
        "qtest",
        help="boot the built-in qtest kernel, probe every instruction of its targets, "
        "and run its self-check",
    )
    p.add_argument("--loops", type=int, default=1, help="self-check rounds (default 1)")
    p.add_argument("--no-probes", action="store_true",
                   help="run the self-check with no probes (just boot and attach)")  # fmt: skip
    machine_options(p)
    p.set_defaults(func=_cmd_qtest)

    p = sub.add_parser("boot", help="boot a guest and hand over its serial console")
    p.add_argument("--kernel", help="kernel image (default: qtest)")
    p.add_argument("--initrd", help="initial ramdisk")
    p.add_argument("--append", default="", help="kernel command line")
    p.add_argument("--memory", type=int, default=512, help="guest RAM in MiB (default 512)")
    machine_options(p)
    p.set_defaults(func=_cmd_boot)

    p = sub.add_parser("attach", help="connect to a running QEMU's gdbstub and describe it")
    p.add_argument("address", help="HOST:PORT or the path of a unix socket")
    p.set_defaults(func=_cmd_attach)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
    except QprobesError as exc:
        print(f"qprobes: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qprobes: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
