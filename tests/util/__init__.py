"""Helpers the test modules share; no test module imports from another one.

- ``util.mount``: any fusefs daemon on a real mount (start, wait, always clean up).
- ``util.daemon``: cmad daemons for one test (``Daemons``, behind the ``daemon``
  fixture in conftest), its command line, arena files in /dev/shm.
- ``util.files``: a mounted tree as a client sees it: read, write, alloc, wait.
- ``util.fsops``: fusefs operations called directly (tier 2): stand-in contexts,
  readdir collectors, lookups by path.
- ``util.core``: the core in process: the default layout, errno checks, a journal
  listening to a core.
- ``util.alloc``: the allocator tests' units and the free space around live chunks.
- ``util.fakes``: stand-ins for the kernel's hugepage pool and for a mounted tree.
- ``util.users``: throwaway users (root only).

Fixtures used by several modules live in ``tests/conftest.py``.
"""
