"""What qprobes reads of a running Linux kernel's own structures.

Above :mod:`qprobes.symbols` (kallsyms and BTF give the addresses and
layouts) and below the front ends: the text the kernel reserves or patches
(ftrace sites, static keys, static calls, alternatives, its own kprobes),
and its tasks and stacks. The probe engine sees these only through the hooks
it defines; :class:`qprobes.frontends.session.Session` connects them.
"""
