"""The memory behind the core: the arena, the hugepage pool and its ledger, the
physical layout, the files of regions shared with a group.

May import the base modules only (``cmad.errors``, ``cmad.memparse``,
``cmad.privileges``); never the core or anything above it.
"""
