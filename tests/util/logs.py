"""Log capture for the tests of bounded, rate-limited lines."""

import logging


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def logger_with(log_filter, name="fusefs"):
    handler = Records()
    handler.addFilter(log_filter)
    log = logging.getLogger(name)
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    return log, handler


def restore(log, handler):
    log.removeHandler(handler)
    log.propagate = True
    log.setLevel(logging.NOTSET)
