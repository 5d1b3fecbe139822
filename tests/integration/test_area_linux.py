"""Where qprobes' area sits in a Linux guest, and a module loaded while probes are armed.

The area must be where no allocator of the guest looks (the unused tail of
the kernel image mapping, after ``_end``), not in the module area, where a
module or BPF program loaded later could be placed on it; with KASLR and
with page-table isolation (an Intel CPU model) alike. Each slot's unused
tail is int3.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from qprobes.arch.x86_64 import insn as x86insn
from qprobes.errors import QprobesError
from qprobes.frontends.session import Session
from qprobes.machine.linux import linux_guest
from qprobes.probes.area import MODULES_END, MODULES_VADDR, REGION_SIZE, START_KERNEL_MAP
from tests.conftest import require_vm

pytestmark = pytest.mark.vm

PROBE = "_raw_spin_lock_irqsave"
BAD = re.compile(r"BUG:|Oops|WARNING:|general protection|unable to handle|Kernel panic")


def boot(**kwargs: object) -> Session:
    try:
        return Session.linux(**kwargs)  # type: ignore[arg-type]
    except QprobesError as exc:
        require_vm(f"the default Linux guest cannot be booted: {exc}")
        raise


def check_placement(session: Session) -> int:
    """The area lies after ``_end`` inside the kernel image mapping; returns its base."""
    assert session.symbols is not None
    vbase = session.engine.area.vbase
    end = session.symbols.address("_end")
    assert vbase >= end, f"area {vbase:#x} is not after _end {end:#x}"
    # KERNEL_IMAGE_SIZE is at most 1 GiB: the module area starts above.
    assert vbase >= START_KERNEL_MAP and vbase + REGION_SIZE <= START_KERNEL_MAP + (1 << 30)
    # Within rel32 reach of all kernel text.
    assert vbase + REGION_SIZE - session.symbols.address("_text") < 1 << 31
    return vbase


def probe_and_run(session: Session) -> int:
    kp = session.kprobe(PROBE, lambda kp, ctx: False)
    out = session.command("qp-work 2")
    assert "qp-work: 2 rounds" in out
    assert kp.nhit > 0
    return kp.nhit


@pytest.fixture(scope="module")
def linux() -> Iterator[Session]:
    session = boot(smp=2)
    try:
        yield session
    finally:
        session.close()


def test_area_is_after_the_kernel_image_not_in_the_module_area(linux: Session) -> None:
    vbase = check_placement(linux)
    # Below MODULES_VADDR whatever KERNEL_IMAGE_SIZE is (512 MiB or 1 GiB).
    assert vbase + REGION_SIZE <= MODULES_VADDR


def test_slot_tails_are_int3(linux: Session) -> None:
    kp = linux.kprobe("vfs_read", lambda kp, ctx: False)
    try:
        point = linux.engine.points[kp.arm_addr]  # type: ignore[index]
        data = linux.engine.kread(point.slot, x86insn.SLOT_SIZE)
        used = len(x86insn.boosted_copy(point.insn, point.slot)) if point.boosted \
            else point.insn.length  # fmt: skip
        assert data[used:] == b"\xcc" * (x86insn.SLOT_SIZE - used)
        assert used < x86insn.SLOT_SIZE
    finally:
        linux.unregister(kp)


def test_module_loaded_while_probes_are_armed_lands_outside_the_area(linux: Session) -> None:
    module = linux_guest().test_module
    assert module, "the guest was built without its test module"
    hits = probe_and_run(linux)
    out = linux.command(f"insmod {module} && cat /sys/module/crc7/sections/.text")
    text = int(out.strip().splitlines()[-1], 16)
    area = linux.engine.area
    assert not area.contains(text), f"module text {text:#x} is inside qprobes' area"
    assert MODULES_VADDR <= text < MODULES_END
    assert "crc7" in linux.command("cat /proc/modules")
    assert "qp-work: 1 rounds" in linux.command("qp-work 1; rmmod crc7")
    dmesg = linux.command("dmesg")
    assert not [line for line in dmesg.splitlines() if BAD.search(line)]
    assert sum(kp.nhit for p in linux.engine.points.values() for kp in p.kprobes) > hits


def test_area_placement_with_kaslr() -> None:
    session = boot(kaslr=True)
    try:
        assert session.kernel is not None and session.kernel.slide != 0
        check_placement(session)
        probe_and_run(session)
    finally:
        session.close()


def test_area_placement_with_page_table_isolation() -> None:
    session = boot(cpu="Skylake-Client")
    try:
        vbase = check_placement(session)
        area = session.engine.area
        assert area._user is not None, "PTI is on with an Intel CPU model"
        # The stubs are mapped in the user half too: user-mode page faults
        # and int3s enter them with the user page tables loaded.
        user_cr3 = area._user
        from qprobes.target.paging import walk

        assert walk(session.target.read_phys_u64, user_cr3, vbase).paddr == \
            walk(session.target.read_phys_u64, area.cr3, vbase).paddr  # fmt: skip
        probe_and_run(session)
    finally:
        session.close()
