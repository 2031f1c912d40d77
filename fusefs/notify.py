"""Telling the kernel to drop cached directory entries.

`pyfuse3.invalidate_entry` blocks until no request touching the parent
directory is in flight, and such a request may be waiting for our own
event loop, so it must not run in the loop's thread. pyfuse3's
`invalidate_entry_async` moves it to a thread but never says when it is
done. This module does the same with one difference that matters to
clients: a write() whose store removed entries is answered only once the
kernel has dropped them (`settle`), so ``echo x > free; ls chunks/x``
fails at once even though entries are cached for minutes.

A request handler may wait in `settle` only if it is not itself a request
the invalidation waits for (a lookup, readdir... in the same directory):
the Filesystem does it in `write` only, and with a time limit.

Each `Filesystem` holds its invalidator (given, or its own); the loop starts
it and `Mount.close` stops it.  A directory the Filesystem hands to the
kernel is given it too, since only an entry the kernel was handed can need
invalidating (`Dir.remove`, `DynamicDir.invalidate`).
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from typing import Optional

import pyfuse3
import trio

log = logging.getLogger("fusefs")


class Invalidator:
    """A thread sending entry invalidations to the kernel, in order."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._token: Optional[trio.lowlevel.TrioToken] = None
        self._queued = 0            # invalidations queued so far
        self._done = 0              # ... and sent (only the thread writes it)
        self._wakeup: Optional[trio.Event] = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._thread = threading.Thread(target=self._loop, args=(token,),
                                        name="fusefs-invalidate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread; False if it is still blocked in the kernel."""
        if self._thread is None:
            return True
        self._queue.put(None)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if not stopped:
            log.warning("invalidation thread still blocked at shutdown")
        self._thread = None
        self._token = None
        return stopped

    def entry(self, parent_inode: int, name: bytes, deleted: int = 0) -> None:
        """Queue: drop the kernel's cached entry *name* of *parent_inode*.

        With *deleted*, the inode the entry had: the kernel also marks it
        deleted (nlink 0), so it evicts the inode, and sends FORGET, as soon
        as nothing uses it, instead of keeping it cached until memory runs
        low (the node would stay in the inode table all that time).
        """
        if self._thread is None:
            return
        self._queued += 1
        self._queue.put((parent_inode, name, deleted, self._queued))

    async def settle(self, timeout: float = 1.0) -> bool:
        """Wait until every invalidation queued so far is sent (True), or
        *timeout* passes (False)."""
        target = self._queued
        if self._done >= target:
            return True
        with trio.move_on_after(timeout):
            while self._done < target:
                if self._wakeup is None:        # one event shared by every waiter
                    self._wakeup = trio.Event()
                if self._done >= target:        # the thread was quicker
                    break
                await self._wakeup.wait()
        return self._done >= target

    def _poke(self) -> None:
        """In the loop's thread: wake every waiter; each rechecks its own target."""
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.set()

    def _loop(self, token: trio.lowlevel.TrioToken) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            parent_inode, name, deleted, number = item
            try:
                pyfuse3.invalidate_entry(parent_inode, name, deleted)
            except OSError as e:
                # ENOENT: the kernel never had it, or had another inode
                # there (dropped all the same); ENOTEMPTY: a directory with
                # entries in use was only dropped, not marked deleted.
                if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                    log.warning("invalidating %r in inode %d: %s", name, parent_inode, e)
            except Exception:
                log.exception("invalidating %r in inode %d", name, parent_inode)
            self._done = number
            try:
                token.run_sync_soon(self._poke)
            except trio.RunFinishedError:
                pass
