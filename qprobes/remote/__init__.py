"""Talking to a GDB stub: :class:`~qprobes.remote.connection.Connection`
(packets over a socket) and :class:`~qprobes.remote.client.GdbClient` (the
requests the rest of qprobes uses)."""
