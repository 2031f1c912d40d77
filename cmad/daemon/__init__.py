"""The daemon: command line, start-up and recovery, arena assembly,
configuration, reload, the tree (show/store rows on fusefs), metrics, the
service, rate limits, the offline commands and the kernel's views.

May import every other role, fusefs and pyfuse3; no role imports it
(``cmad.main`` is only the entry point).
"""
