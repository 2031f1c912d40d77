"""The one exception of the core: an errno and a sentence saying why."""

import errno as _errno
import os


class CmaError(OSError):
    """A failed CMA operation.  ``.errno`` is the contract, ``.why`` the log line.

    Subclasses OSError so a caller may handle it like any system call error;
    the filesystem layer turns ``.errno`` into the FUSE reply.
    """

    def __init__(self, errno: int, why: str):
        super().__init__(errno, why)
        self.why = why

    def __str__(self) -> str:
        return f"{_errno.errorcode.get(self.errno, self.errno)}: {self.why}"


def einval(why: str) -> CmaError:
    return CmaError(_errno.EINVAL, why)


CLIP = 80


def clip(text: str, limit: int = CLIP) -> str:
    """The repr of client text for a log line, cut to ``limit`` characters with a
    marker saying how much was left out: a 4 KiB write never makes a 4 KiB line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}...(+{len(text) - limit} chars)"


__all__ = ["CmaError", "clip", "einval", "os"]
