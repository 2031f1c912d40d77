"""The core, in process: grammars (``regions``, ``map``, ``request``), chunks
and their indexes, ``events`` (listeners in tiers, veto and undo), the
``mover``, ``compaction``, ``recovery`` and the ``Cma`` facade.

May import the allocators, memory and the base modules; never the daemon, the
store, the clients, fusefs, pyfuse3 or trio (import-linter checks it).
"""
