"""``qprobes boot``: the guest's console at a real pseudo-terminal.

The test plays the terminal: it types as a user would (a pause before a
Ctrl-C, as a person takes) and answers busybox's cursor-position query
(``ESC[6n``) the way a terminal emulator does.
"""

from __future__ import annotations

import time

import pytest

from tests.integration.terminal import PtySession

pytestmark = pytest.mark.vm

PROMPT = b"qprobes-guest# "
CURSOR_QUERY = b"\x1b[6n"
CURSOR_REPLY = b"\x1b[8;16R"


def boot() -> PtySession:
    session = PtySession(["boot"])
    text = session.read_until(PROMPT, timeout=240)
    assert b"Ctrl-A x quits" in text, text
    return session


def answer_cursor_queries(session: PtySession, seen: int) -> int:
    count = session.output.count(CURSOR_QUERY)
    for _ in range(count - seen):
        session.send(CURSOR_REPLY)
    return count


def test_raw_terminal_echoes_once_and_exit_status_is_the_guests(guest: object) -> None:
    session = boot()
    session.read_until(PROMPT + CURSOR_QUERY, timeout=60)
    queries = answer_cursor_queries(session, 0)
    mark = len(session.output)
    session.send(b"echo hi-$((6*7))\r")
    session.read_until(b"hi-42", timeout=60, start=mark)
    mark = session.output.index(b"hi-42", mark)
    # The line editor asks for the cursor position right after each prompt.
    session.read_until(PROMPT + CURSOR_QUERY, timeout=60, start=mark)
    queries = answer_cursor_queries(session, queries)
    assert queries >= 2  # the line editor asked at each prompt
    # Only the guest echoes: the typed line shows once; the terminal's
    # answers to the cursor query go to the guest, never to the screen.
    assert session.output.count(b"echo hi-$((6*7))") == 1, session.output
    assert b"8;16R" not in session.output, session.output
    # Ctrl-C reaches the guest's shell and interrupts its command, not qprobes.
    session.send(b"sleep 100\r")
    time.sleep(2.0)
    session.send(b"\x03")
    session.read_until(b"^C", timeout=30)
    time.sleep(1.0)
    answer_cursor_queries(session, queries)
    session.send(b"exit 3\r")
    assert session.wait(timeout=60) == 3, session.output[-500:]


def test_ctrl_d_ends_the_guest_shell(guest: object) -> None:
    session = boot()
    answer_cursor_queries(session, 0)
    time.sleep(0.5)
    session.send(b"\x04")
    assert session.wait(timeout=60) == 0, session.output[-500:]
    assert b"shell exited with status 0" in session.output


def test_ctrl_a_x_quits(guest: object) -> None:
    session = boot()
    session.send(b"\x01x")
    assert session.wait(timeout=60) == 0, session.output[-500:]
    assert b"quit (Ctrl-A x)" in session.output
