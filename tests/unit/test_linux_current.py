"""qprobes.linux.current: when a task counts as gone, on a fake kernel."""

from __future__ import annotations

import struct

import pytest

from qprobes.errors import QprobesError, SymbolError
from qprobes.linux.current import TASK_DEAD, LinuxTasks

TASK = 0xFFFF888000A00000
STATE, STACK = 0x18, 0x20
STACK_AT_ENTRY = 0xFFFFC90000010000


class FakeBtf:
    def struct_member_offset(self, struct_name: str, path: str) -> tuple[int, int]:
        members = {"__state": (STATE, 4), "stack": (STACK, 8)}
        if struct_name != "task_struct" or path not in members:
            raise SymbolError(f"no {struct_name}.{path}")
        return members[path]


class FakeKernel:
    btf = FakeBtf()


def tasks_with(state: int | None, stack: int | None) -> LinuxTasks:
    def read(addr: int, length: int) -> bytes:
        if addr == TASK + STATE and state is not None:
            return struct.pack("<I", state)[:length]
        if addr == TASK + STACK and stack is not None:
            return struct.pack("<Q", stack)[:length]
        raise QprobesError(f"unmapped {addr:#x}")

    return LinuxTasks(FakeKernel(), read)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "stack", "gone"),
    [
        (0x0000, STACK_AT_ENTRY, False),  # running
        (0x0001, STACK_AT_ENTRY, False),  # TASK_INTERRUPTIBLE: asleep in the call
        (TASK_DEAD, STACK_AT_ENTRY, True),  # past do_task_dead()
        (0x0000, 0, True),  # its stack was freed (task->stack = NULL)
        (0x0000, STACK_AT_ENTRY + 0x4000, True),  # task_struct reused by another task
        (None, None, False),  # unreadable: keep the instance
    ],
)
def test_is_gone(state: int | None, stack: int | None, gone: bool) -> None:
    tasks = tasks_with(state, stack)
    assert tasks.is_gone(TASK, STACK_AT_ENTRY) is gone


def test_stack_of_reads_task_stack() -> None:
    assert tasks_with(0, STACK_AT_ENTRY).stack_of(TASK) == STACK_AT_ENTRY
