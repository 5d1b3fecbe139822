"""The GDB remote serial protocol as pure code (no I/O).

- :mod:`qprobes.wire.packet`: framing, checksums, escapes, run-length
  encoding, hex, and the incremental :class:`~qprobes.wire.packet.PacketDecoder`;
- :mod:`qprobes.wire.stop`: stop replies;
- :mod:`qprobes.wire.threads`: thread ids;
- :mod:`qprobes.wire.replies`: replies to general queries;
- :mod:`qprobes.wire.features`: target descriptions and the register layout.
"""
