"""The memory behind the core: the arena, the hugepage pool and its ledger, the
physical layout, the files of regions shared with a group.

One job a module: ``arena`` (the mapped memory), ``kernelpool`` (the kernel's
counters and the pool lock), ``pool`` (one daemon's pool), ``ledger`` (the
pages any cmad added), ``rundir`` and ``mounts`` (where arena files live),
``pagemap`` (the one frame reader), ``gather`` (pages sorted by frame),
``layout`` (runs planned, decided, recorded), ``physmap`` (the arena file
created), ``shared`` (regions shared with a group).  ``hugepages`` only
gathers the pool's names for importers.

May import the base modules only (``cmad.errors``, ``cmad.memparse``,
``cmad.privileges``); never the core or anything above it.
"""
