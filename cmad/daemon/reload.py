"""SIGHUP: re-read the configuration; what each key does is in config.KEYS."""

from __future__ import annotations

import argparse
import logging

from cmad.core.cma import Cma
from cmad.daemon.config import LAYOUT, RESTART, Config, flag_values, keys_reloaded, load
from cmad.daemon.preflight import layout
from cmad.errors import CmaError

log = logging.getLogger("cmad")


class Reloader:
    """SIGHUP: re-read the configuration.  The map and limits take effect; a
    changed region layout is refused (chunks are never dropped by a reload)."""

    def __init__(self, cma: Cma, config: Config, args: argparse.Namespace):
        self.cma, self.config, self.args = cma, config, args

    def __call__(self) -> None:
        try:
            new = load(self.args.config, flag_values(self.args))
            changed_layout = layout(new) != layout(self.config)
        except Exception as e:  # a reload never takes the daemon down
            log.error("reload: %s; keeping the running configuration", getattr(e, "why", e))
            return
        if changed_layout:
            log.error("reload: the region layout changed (%r); refused, the running regions "
                      "stay: restart the daemon to apply it", new.regions)
            for key in keys_reloaded(LAYOUT):
                setattr(new, key, getattr(self.config, key))
        from fusefs import resolve
        new.mountpoint = resolve(new.mountpoint)  # the running one is resolved (main)
        for key in keys_reloaded(RESTART):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; it takes effect at the next start", key)
                setattr(new, key, getattr(self.config, key))
        try:
            self.cma.set_map(new.map)
        except CmaError as e:
            log.error("reload: map: %s; keeping the running map", e.why)
            new.map = self.cma.map
        self.cma.limits = dict(new.limits)
        logging.getLogger().setLevel(new.log_level.upper())
        self.config = new
        log.info("reload: map %r, limits %s", self.cma.map, self.cma.limits or "none")
