"""ftrace hist triggers computed on the host: parsing, keys, printing.

The expected lines are the 6.1 guest's own ``hist`` file for the same
triggers (taken from the default guest)."""

from __future__ import annotations

import pytest

from qprobes.errors import ProbeSyntaxError
from qprobes.tracing import FilterField
from qprobes.tracing.events import TraceEvent
from qprobes.tracing.hist import Histogram, log2_bucket, parse_hist

FIELDS = [
    FilterField("path", is_string=True),
    FilterField("dfd", size=4, signed=True),
    FilterField("flags", size=8),
    FilterField("x", size=8),
    FilterField("r", size=8),
]


def _event(pid: int = 95, comm: str = "cat", cpu: int = 0, **fields: object) -> TraceEvent:
    return TraceEvent(
        group="kprobes",
        event="kopen",
        kind="p",
        addr=0,
        location="do_sys_openat2+0x0/0x170",
        ret_to=None,
        cpu=cpu,
        pid=pid,
        comm=comm,
        timestamp_ns=0,
        fields=dict(fields),
        text="",  # type: ignore[arg-type]
    )


def _hist(trigger: str, **kw: object) -> Histogram:
    return Histogram("kopen", parse_hist(trigger, FIELDS), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trigger", "described"),
    [
        (
            "hist:keys=common_pid.execname,path:vals=hitcount,flags:sort=hitcount.descending",
            "hist:keys=common_pid.execname,path:vals=hitcount,flags:sort=hitcount.descending:size=2048",
        ),
        (
            "hist:keys=flags.hex:vals=hitcount",
            "hist:keys=flags.hex:vals=hitcount:sort=hitcount:size=2048",
        ),
        ("hist:keys=dfd.log2", "hist:keys=dfd.log2:vals=hitcount:sort=hitcount:size=2048"),
        (
            "hist:keys=x.buckets=4096",
            "hist:keys=x.buckets=4096:vals=hitcount:sort=hitcount:size=2048",
        ),
        (
            "hist:keys=cpu,x.sym-offset:vals=hitcount:sort=hitcount.descending:size=200",
            "hist:keys=common_cpu,x.sym-offset:vals=hitcount:sort=hitcount.descending:size=256",
        ),
        (
            "hist:key=path:size=3000 if dfd < 0",
            "hist:keys=path:vals=hitcount:sort=hitcount:size=4096 if dfd < 0",
        ),
        (
            "hist:keys=path,dfd:sort=path,dfd.descending",
            "hist:keys=path,dfd:vals=hitcount:sort=path,dfd.descending:size=2048",
        ),
    ],
)
def test_the_trigger_prints_as_the_kernel_prints_it(trigger: str, described: str) -> None:
    assert parse_hist(trigger, FIELDS).describe() == described


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("hist:keys=nosuch", "Couldn't find field 'nosuch'"),
        ("hist:keys=path.hex", "Invalid field modifier"),
        ("hist:keys=dfd.execname", "Invalid field modifier: .execname is for common_pid"),
        ("hist:keys=dfd.bogus", "Invalid field modifier"),
        ("hist:keys=x.buckets=1", ".buckets=N wants N of 2 or more"),
        ("hist:keys=path:vals=path", "path is not a number"),
        ("hist:keys=path:vals=dfd.log2", "Invalid field modifier"),
        ("hist:keys=path:sort=flags", "Sort field must be a key or a val"),
        ("hist:keys=path:sort=path.up", "Invalid sort modifier"),
        ("hist:keys=path,dfd,x,flags", "Too many keys (Max = 3)"),
        ("hist:keys=path,dfd:sort=hitcount,path,dfd", "Too many sort fields (Max = 2)"),
        ("hist:keys=path:size=64000000", "the map holds 128 to 131072 entries"),
        ("hist:keys=path:size=64", "the map holds 128 to 131072 entries"),  # the 6.1 guest: EINVAL
        ("hist:vals=hitcount", "a hist trigger needs keys="),
        ("hist:keys=path:onmax(dfd).save(path)", "is not supported"),
        ("hist:keys=stacktrace", "stacktrace keys need kernel stack traces"),
        ("histo:keys=path", "not a hist trigger"),
        ("hist:keys=path if ", "an empty filter after 'if'"),
    ],
)
def test_bad_triggers_say_why(trigger: str, message: str) -> None:
    with pytest.raises(ProbeSyntaxError) as err:
        parse_hist(trigger, FIELDS)
    assert message in err.value.message


def test_execname_and_string_keys_print_in_the_kernels_widths() -> None:
    hist = _hist("hist:keys=common_pid.execname,path:vals=hitcount:sort=hitcount.descending")
    for _ in range(5):
        hist.update(_event(92, "sh", path="/sys/kernel/tracing/events/kprobes/kopen/trigger"))
    hist.update(_event(95, "cat", path="/etc/hostname"))
    lines = hist.format().splitlines()
    assert lines[:5] == [
        "# event histogram",
        "#",
        "# trigger info: hist:keys=common_pid.execname,path:vals=hitcount"
        ":sort=hitcount.descending:size=2048 [active]",
        "#",
        "",
    ]
    assert lines[5:7] == [
        "{ common_pid: sh              [        92], path: "
        "/sys/kernel/tracing/events/kprobes/kopen/trigger   } hitcount:          5",
        "{ common_pid: cat             [        95], path: "
        "/etc/hostname                                      } hitcount:          1",
    ]
    assert lines[7:] == ["", "Totals:", "    Hits: 6", "    Entries: 2", "    Dropped: 0"]
    assert hist[(92, "/sys/kernel/tracing/events/kprobes/kopen/trigger")] == 5


def test_values_sum_as_u64_and_hex_keys() -> None:
    hist = _hist("hist:keys=flags.hex:vals=hitcount,x")
    hist.update(_event(flags=0xFFFFC9000059BC20, x=1))
    hist.update(_event(flags=0xFFFFC9000059BC20, x=(1 << 64) - 1))  # wraps to 0
    assert hist.format().splitlines()[5] == (
        "{ flags: ffffc9000059bc20 } hitcount:          2  x:          0"
    )


def test_log2_of_a_signed_field_is_taken_on_its_u64() -> None:
    # dfd = AT_FDCWD (-100): the kernel's hist showed "{ dfd: ~ 2^64 }".
    assert log2_bucket((-100) & ((1 << 64) - 1)) == 64
    assert [log2_bucket(v) for v in (1, 2, 3, 4, 5, 1024, 1025)] == [0, 1, 2, 2, 3, 10, 11]
    hist = _hist("hist:keys=dfd.log2")
    for _ in range(11):
        hist.update(_event(dfd=-100))
    assert hist.format().splitlines()[5] == "{ dfd: ~ 2^64 } hitcount:         11"
    assert hist[64] == 11


def test_buckets_sym_and_syscall_keys() -> None:
    hist = _hist("hist:keys=x.buckets=4096")
    hist.update(_event(x=0))
    hist.update(_event(x=4095))
    assert hist.format().splitlines()[5] == "{ x: ~ 0-4095 } hitcount:          2"

    def resolve(addr: int) -> tuple[str, int, int, str | None] | None:
        return ("kfree", addr - 0x1000, 0x100, None) if 0x1000 <= addr < 0x1100 else None

    sym = _hist("hist:keys=x.sym", resolve=resolve)
    sym.update(_event(x=0xFFFF888005933020))
    assert sym.format().splitlines()[5] == (
        "{ x: [ffff888005933020] 0xffff888005933020" + " " * 28 + "} hitcount:          1"
    )
    offs = _hist("hist:keys=x.sym-offset", resolve=resolve)
    offs.update(_event(x=0x1010))
    assert offs.format().splitlines()[5] == (
        "{ x: [1010] " + f"{'kfree+0x10/0x100':<55}" + " } hitcount:          1"
    )
    sc = _hist("hist:keys=r.syscall", syscall_name={0: "sys_read"}.get)
    for _ in range(7):
        sc.update(_event(r=0))
    sc.update(_event(r=999))
    lines = sc.format().splitlines()
    assert lines[5] == "{ r: unknown_syscall               [999] } hitcount:          1"
    assert lines[6] == "{ r: sys_read                      [  0] } hitcount:          7"


def test_a_full_map_drops_new_keys_and_counts_them() -> None:
    hist = _hist("hist:keys=x:size=128")
    for x in range(130):
        hist.update(_event(x=x))
    hist.update(_event(x=0))
    assert len(hist) == 128
    assert hist.dropped == 2
    assert hist.hits == 129
    assert hist.format().splitlines()[-3:] == [
        "    Hits: 129",
        "    Entries: 128",
        "    Dropped: 2",
    ]


def test_the_triggers_own_filter_chooses_what_it_counts() -> None:
    hist = _hist('hist:keys=path if path ~ "/etc/*"')
    hist.update(_event(path="/etc/hostname"))
    hist.update(_event(path="/proc/version"))
    assert hist.counts() == {"/etc/hostname": 1}


def test_sort_order_and_json() -> None:
    hist = _hist("hist:keys=common_pid,path:sort=common_pid")
    hist.update(_event(pid=7, path="b"))
    hist.update(_event(pid=3, path="a"))
    hist.update(_event(pid=7, path="b"))
    assert [e.key for e in hist.sorted_entries()] == [(3, "a"), (7, "b")]
    data = hist.as_json()
    assert data["entries"][1] == {"key": {"common_pid": 7, "path": "b"}, "hitcount": 2}
    assert data["totals"] == {"hits": 3, "entries": 2, "dropped": 0}


def test_log2_chart() -> None:
    hist = _hist("hist:keys=x.log2")
    for x in (1, 2, 3, 4, 100, 100):
        hist.update(_event(x=x))
    chart = hist.log2_chart()
    assert chart is not None
    lines = chart.splitlines()
    assert lines[0] == "@x:"
    assert lines[1].startswith("[1] ") and lines[1].split("|")[0].split()[-1] == "1"
    assert lines[3].startswith("(2, 4]") and " 2 |" in lines[3]
    assert lines[-1].startswith("(64, 128]") and " 2 |" in lines[-1]
    assert _hist("hist:keys=x").log2_chart() is None
