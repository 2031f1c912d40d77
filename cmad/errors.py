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


__all__ = ["CmaError", "einval", "os"]
