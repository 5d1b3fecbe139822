"""qprobes: Linux-style kprobes run from the host, through QEMU's gdbstub."""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Lazy, so that `import qprobes` stays cheap for the CLI.
    if name == "Session":
        from qprobes.frontends.session import Session

        return Session
    raise AttributeError(f"module 'qprobes' has no attribute {name!r}")
