"""The one boundary every FUSE handler passes: errors become FUSEError.

pyfuse3 ends its main loop, and with it the daemon, on any exception other
than FUSEError, so FUSEError passes, an OSError (the tree's way to refuse; it
may carry a `.why`) becomes its errno with one log line naming the operation,
the node and the reason (none if it has a true `.logged`: it was logged where
it was raised), and anything else becomes EIO with a logged traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
from typing import Callable

from pyfuse3 import FUSEError

__all__ = ["boundary", "describe_error"]

log = logging.getLogger("fusefs")

# Refusals that say something about who asked: worth a warning.
_WARN_ERRNOS = frozenset({errno.EPERM, errno.EACCES})


def describe_error(e: OSError) -> str:
    """'EINVAL: why' for a log line."""
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else "?"
    return f"{name}: {getattr(e, 'why', None) or e.strerror or e}"


def boundary(op: str, target: str = "inode") -> Callable:
    """Wrap a handler: errors become FUSEError, never anything else.

    *target* says how the handler's first arguments name the node for the
    log line: "inode", "fh" (open file), "dir" (open directory), "entry"
    (parent inode, name) or "none".
    """
    def decorate(fn):
        @functools.wraps(fn)
        async def handler(self, *args):
            # An open file is looked up first: release drops it before
            # an error from the handle's release() reaches us.
            opened = self._handles.get(args[0]) if target == "fh" else None
            try:
                return await fn(self, *args)
            except FUSEError:
                raise
            except OSError as e:
                code = e.errno if e.errno else errno.EIO
                if not getattr(e, "logged", False):
                    level = logging.WARNING if code in _WARN_ERRNOS else logging.INFO
                    log.log(level, "%s %s: %s", op, self._where(target, args, opened),
                            describe_error(e))
                raise FUSEError(code) from None
            except Exception:
                # A client can repeat whatever request found the bug: rate-limited
                # like every line a client can cause (cmad/ratelimit.py).
                log.exception("%s %s: unexpected error, answering EIO",
                              op, self._where(target, args, opened), extra={"client": True})
                raise FUSEError(errno.EIO) from None
        return handler
    return decorate
