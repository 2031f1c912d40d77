"""Fault injection for crash tests: ``CMAD_FAULT=<point>`` kills the daemon there."""

import logging
import os
import signal

log = logging.getLogger(__name__)


def point(name: str) -> None:
    if os.environ.get("CMAD_FAULT") == name:
        log.warning("fault injection: killing the daemon at %r", name)
        os.kill(os.getpid(), signal.SIGKILL)
