"""Recovery policy: what a start does with the journal's rows and records.

The store (``cmad.store``) keeps and checks the rows; this decides what comes
back into the core.  Runtime allocators come back first, unless the
configuration changed since and the region is empty.  Transient chunks are
dropped (their handles died with the daemon), and every row is dropped when
the arena's bytes are gone (a reboot).  A row its column may not hold, or a
chunk that does not fit the configured regions, refuses the start and
changes nothing: a dropped row would hand memory a client may still be
using to someone else.  (Putting chunks back in place is the core's
``cmad.core.recovery``.)
"""

from __future__ import annotations

import errno
import logging
from typing import Iterator

from cmad.core.chunks import Chunk
from cmad.core.cma import Cma
from cmad.core.regions import alloc_spec_text
from cmad.errors import CmaError
from cmad.memparse import fmt_addr
from cmad.store.journal import Journal
from cmad.store.rows import TRANSIENT, BadRow

log = logging.getLogger(__name__)


def restore_allocators(cma: Cma, journal: Journal) -> None:
    """Give back the allocators written to regions' ``alloc`` files at runtime,
    before the chunks they made are recovered (SPEC 5: a restart never fails
    because of them).

    The configuration wins where it changed that region's allocator since the
    write (the administrator's later word), unless the region has journalled
    chunks: those were made by the runtime allocator and could not be put back
    by another, so it stays, with a warning, until a start finds the region empty.
    """
    names = {region.name for region in cma.regions}
    for gone in set(journal.runtime_allocator_regions()) - names:
        if not journal.readonly:  # a region the configuration no longer has
            journal.forget_allocator(gone)
    for region in cma.regions:
        saved = journal.runtime_allocator(region.name)
        if saved is None:
            continue
        runtime, configured_then = saved
        configured = alloc_spec_text(region.configured)
        if configured != configured_then:
            chunks = journal.count(region.name)
            if not chunks:
                log.info("region %s: the configuration's allocator %r replaces %r, written "
                         "to its alloc file at runtime", region.name, configured, runtime)
                if not journal.readonly:
                    journal.forget_allocator(region.name)
                continue
            log.warning("region %s: keeping allocator %r, written to its alloc file at "
                        "runtime, for its %d journalled chunks; the configuration's %r "
                        "applies at a start that finds the region empty", region.name,
                        runtime, chunks, configured)
        try:
            cma.set_allocator(region.name, runtime)
        except CmaError as e:
            log.warning("region %s: cannot restore allocator %r written at runtime (%s); "
                        "the configuration's %r stays", region.name, runtime, e.why,
                        configured)
            continue
        log.info("region %s: allocator %r, written to its alloc file at runtime, restored",
                 region.name, runtime)


def restore_record(cma: Cma, record: dict) -> Chunk:
    """Put one journalled chunk back in ``cma`` (CmaError if it does not fit)."""
    fields = {k: v for k, v in record.items()
              if k not in ("id", "start", "size", "region", "dev", "type")}
    return cma.restore(record["id"], record["start"], record["size"], record["region"],
                       record["dev"], record["type"], **fields)


def recover(cma: Cma, journal: Journal, *, arena_survived: bool) -> int:
    """Put every journalled chunk back in ``cma``, in bulk; returns how many.

    Transient chunks are freed (their handles died with the daemon).  If the
    arena file is gone (a reboot) the records are dropped with a warning.  If
    any row holds what its column may not, or does not fit the configured
    regions, nothing is changed and CmaError names it: start-up must stop,
    not drop chunks.
    """
    if not arena_survived:
        ids = journal.ids()
        if ids:
            log.warning("journal: the arena file is gone (reboot?): dropping %d recorded "
                        "chunks whose bytes are lost", len(ids))
            journal.forget(ids)
        return 0
    transient: list[tuple] = []

    def kept() -> Iterator[tuple]:
        for batch in journal.rows():
            for row in batch:
                if row[TRANSIENT]:
                    transient.append(row)
                else:
                    yield row

    try:
        count = cma.restore_many(kept())
    except BadRow:
        raise
    except CmaError as e:
        raise CmaError(errno.EINVAL, "journalled chunks do not fit the configured regions "
                                     "(refusing to start; fix the configuration or run "
                                     "'cmad reset'): " + e.why) from None
    if transient:
        log.info("journal: freed %d transient chunks whose handles died with the daemon: %s",
                 len(transient), " ".join(fmt_addr(r[1]) for r in transient[:20])
                 + (" ..." if len(transient) > 20 else ""))
        journal.forget([r[0] for r in transient])
    log.info("journal: recovered %d chunks", count)
    return count
