"""qprobes: Linux-style kprobes run from the host, through QEMU's gdbstub."""

__version__ = "0.1.0"
