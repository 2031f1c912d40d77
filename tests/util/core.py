"""The core in process: the default layout, errno checks, a journal listening."""

from __future__ import annotations

import pytest

from cmad import CmaError

DEFAULT = "video=32M:bf;common=16M:buddy;dma=8M:bitmap"
MAP = "camera,video=video;*=common"


def raises(err: int, fn, *args, match=None, **kwargs) -> CmaError:
    """Call ``fn``; it must refuse with ``CmaError`` of errno ``err``."""
    with pytest.raises(CmaError, match=match) as e:
        fn(*args, **kwargs)
    assert e.value.errno == err, e.value
    return e.value


def attach(cma, listener):
    """Make ``listener`` (a journal, a veto) hear the core's events from now on: the
    one place tests know how a core takes its listeners."""
    cma.listeners.append(listener)
    return listener
