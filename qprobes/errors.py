"""The exceptions qprobes raises.

Every error derives from :class:`QprobesError`. Subclasses carry the fields a
caller needs to act on the failure (the packet, the address, the command
line); lower-level errors are wrapped with ``raise ... from exc``.
"""

from __future__ import annotations


class QprobesError(Exception):
    """Root of every error raised by qprobes."""


# --- wire protocol and connection -------------------------------------------


class ProtocolError(QprobesError):
    """The stub sent something the GDB remote protocol does not allow here."""

    def __init__(self, message: str, packet: bytes | None = None) -> None:
        self.packet = packet
        if packet is not None:
            shown = packet if len(packet) <= 80 else packet[:77] + b"..."
            message = f"{message} (packet {shown!r})"
        super().__init__(message)


class ChecksumError(ProtocolError):
    """A packet's checksum did not match its payload."""


class StubError(ProtocolError):
    """The stub answered ``E NN`` to a request."""

    def __init__(self, request: bytes, code: int, packet: bytes | None = None) -> None:
        self.request = request
        self.code = code
        shown = request if len(request) <= 40 else request[:37] + b"..."
        super().__init__(f"stub answered error {code:#04x} to {shown!r}", packet)


class MemoryAccessError(StubError):
    """The stub answered ``E NN`` to a memory read or write.

    ``addr`` and ``length`` name the chunk the stub refused; ``partial``
    holds the bytes a read got before it (from the start of the request).
    """

    def __init__(
        self,
        request: bytes,
        code: int,
        addr: int,
        length: int,
        partial: bytes = b"",
        packet: bytes | None = None,
    ) -> None:
        self.addr = addr
        self.length = length
        self.partial = partial
        super().__init__(request, code, packet)


class UnsupportedError(ProtocolError):
    """The stub answered an empty packet: it does not support the request."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        shown = request if len(request) <= 40 else request[:37] + b"..."
        super().__init__(f"stub does not support {shown!r}")


class ConnectionClosedError(QprobesError):
    """The connection to the stub was closed or dropped."""


class StubTimeoutError(QprobesError):
    """The stub did not answer within the timeout."""


# --- target -------------------------------------------------------------------


class TargetError(QprobesError):
    """An operation on the target (registers, memory, run control) failed."""


class TranslationError(TargetError):
    """A virtual address has no present mapping in the guest's page tables."""

    def __init__(self, vaddr: int, level: str, entry: int | None = None) -> None:
        self.vaddr = vaddr
        self.level = level
        self.entry = entry
        super().__init__(f"{vaddr:#x} is not mapped ({level} entry not present)")


class TargetRunningError(TargetError):
    """The operation needs the target stopped, but it is running."""


# --- machine ------------------------------------------------------------------


class MachineError(QprobesError):
    """The QEMU process could not be started, or it died."""


class GuestDiedError(MachineError):
    """The guest went away under qprobes: it panicked, or its QEMU exited or
    was killed (while booting, or mid-trace).

    ``why`` is one line (``the guest panicked (QEMU exited with status 0)``,
    ``QEMU was killed by signal 9 (SIGKILL)``); ``console`` holds the last
    lines of the guest's console (a panic and its stack), empty when qprobes
    has none (a QEMU it attached to). ``str()`` is ``why``, then the console
    lines indented.
    """

    def __init__(self, why: str, console: list[str] | None = None) -> None:
        self.why = why
        self.console = list(console or [])
        text = why
        if self.console:
            text += "; the last lines of its console:\n"
            text += "\n".join(f"    {line}" for line in self.console)
        super().__init__(text)


class LaunchError(MachineError):
    """QEMU failed to start; carries the command line and QEMU's output."""

    def __init__(self, message: str, cmdline: list[str], output: str) -> None:
        self.cmdline = cmdline
        self.output = output
        text = f"{message}\ncommand: {' '.join(cmdline)}"
        if output.strip():
            text += f"\noutput:\n{output.rstrip()}"
        super().__init__(text)


# --- instructions, probes, symbols --------------------------------------------


class InstructionError(QprobesError):
    """An instruction could not be decoded or cannot run out of line."""

    def __init__(self, addr: int, reason: str) -> None:
        self.addr = addr
        self.reason = reason
        super().__init__(f"{addr:#x}: {reason}")


class DecoderDisagreementError(InstructionError):
    """The two decoders (capstone and iced-x86) read the bytes differently.

    Raised when one of them cannot decode an instruction the other can, when
    they disagree on its length or on what instruction it is, or when
    capstone's layout detail contradicts the bytes. Neither reading can be
    trusted, so neither the instruction nor anything after it in its
    function can be probed.
    """


class SlotRangeError(InstructionError):
    """An instruction slot is more than ±2 GiB from an address its copy must name.

    Raised when a rip-relative operand, a relocated branch target or the jmp
    back does not fit in a signed 32-bit displacement from the slot (2.6's
    ``arch_copy_kprobe`` had ``BUG_ON`` there). ``addr`` is the probed
    instruction's address.
    """

    def __init__(self, addr: int, slot_addr: int, target: int, what: str) -> None:
        self.slot_addr = slot_addr
        self.target = target
        super().__init__(
            addr,
            f"slot {slot_addr:#x} is out of rip-relative reach of the {what} {target:#x} "
            "(more than ±2 GiB away)",
        )


class ProbeError(QprobesError):
    """A probe could not be registered, armed or removed."""


class DetourError(ProbeError):
    """A probe cannot be jump-optimized (a detour); it stays on its int3.

    Never reaches the user as an error: the engine keeps the probe on the
    int3 path and records ``reason`` (``Kprobe.detour_refused``).
    """

    def __init__(self, addr: int, reason: str) -> None:
        self.addr = addr
        self.reason = reason
        super().__init__(reason)


class QuiesceError(ProbeError):
    """Something in the guest can still return into qprobes' area.

    ``references`` describes each vCPU rip, stack word or undecided task that
    still pointed in when the wait ended.
    """

    def __init__(self, message: str, references: list[str]) -> None:
        self.references = references
        super().__init__(message)


class ProbeSyntaxError(QprobesError):
    """A probe definition or event filter is malformed (or names what cannot be resolved).

    ``spec`` is the text, ``column`` the 0-based position of the fault in it
    and ``message`` the reason, in the words of Linux's ``error_log``
    (``kernel/trace/trace_probe.h``, ``ERRORS``) where Linux has words for it.
    ``str()`` is one line; :meth:`format_caret` gives the text and a caret
    under the column, as ``tracing/error_log`` shows them.
    """

    def __init__(self, spec: str, column: int, message: str) -> None:
        self.spec = spec
        self.column = max(0, min(column, len(spec)))
        self.message = message
        super().__init__(f"error: {message}: {spec!r} at column {self.column}")

    def format_caret(self) -> str:
        """Two lines: the text, then ``^`` under :attr:`column` (tabs kept so it lines up)."""
        pad = "".join("\t" if c == "\t" else " " for c in self.spec[: self.column])
        return f"{self.spec}\n{pad}^"


class SymbolError(QprobesError):
    """A symbol could not be resolved."""
