"""/run/cmad and its kin: the directories only this daemon's user may write, and file names.

Arena files live where only root can write: ``/run/cmad/`` (root, 0700); a
daemon run by another user keeps them in its own runtime directory.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from cmad.errors import CmaError

RUN_DIR = "/run/cmad"


def escaped_name(mountpoint: str, state_dir: str | None = None) -> str:
    """A file name no two mountpoints (and no two state directories) share: a
    readable escape plus a hash of the path and of the state directory's.

    ``/tmp/a-b`` and ``/tmp/a/b`` escape alike (``tmp-a-b``) but hash apart; two
    state directories on one mountpoint get two arena files, so neither daemon
    ever removes the other's.
    """
    path = os.path.abspath(mountpoint)
    readable = "".join(c if c.isalnum() or c in "._" else "-" for c in path.strip("/"))[:80]
    key = path if not state_dir else f"{path}\0{os.path.realpath(state_dir)}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"cmad-{readable or 'root'}-{digest}"


def private_dir(path: str) -> str:
    """Create (or check) a directory of ours with mode 0700; EPERM if someone else's."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise CmaError(e.errno, f"cannot create {path}: {e.strerror}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CmaError(errno.EPERM, f"{path} is not a directory of uid {os.geteuid()} with "
                                    f"mode 0700 (uid {st.st_uid}, mode "
                                    f"{stat.S_IMODE(st.st_mode):o}): refusing to keep arena "
                                    "files there; remove it")
    return path


def user_dir() -> str:
    """A daemon run by another user than root keeps its files here: its own
    ``$XDG_RUNTIME_DIR/cmad`` (a tmpfs only that user can write) where there is
    one, else ``/dev/shm/cmad-<uid>`` (where another user could squat the name:
    then start fails saying so, and XDG_RUNTIME_DIR is the remedy)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    try:
        st = os.stat(runtime) if runtime.startswith("/") else None
    except OSError:
        st = None
    if st is not None and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
        return os.path.join(runtime, "cmad")
    return f"/dev/shm/cmad-{os.geteuid()}"
