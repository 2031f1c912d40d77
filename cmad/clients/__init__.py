"""The clients: ``client`` (the Python API: `Client`, with ``buffer`` and
``tables``), ``cmactl`` (with ``cmactl_out``, ``cmactl_cmds`` and
``cmactl_trace``).

They speak the daemon's files only: they may import the base modules
(``cmad.errors``, ``cmad.memparse``), never the daemon, the store, the core,
memory, the allocators, fusefs or pyfuse3 (import-linter checks it).
"""
