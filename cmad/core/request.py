"""The ``alloc`` file's requests on the core: `cmad.protocol` holds the grammar
(parse and format, one copy for both sides); this module parses with the
core's rules for names and labels and makes the chunk.
"""

from __future__ import annotations

from cmad import protocol
from cmad.core.chunks import Chunk, check_label
from cmad.core.regions import check_name
from cmad.protocol import FLAGS, Request

__all__ = ["FLAGS", "Request", "parse_request", "result_line", "run"]


def parse_request(text: str) -> Request:
    """A request line, its names and label held to the core's rules."""
    return protocol.parse_request(text, check_name, check_label)


def run(cma, text: str, *, uid: int = 0, pid: int = 0) -> Chunk:
    """Parse one request and make it on ``cma``."""
    req = parse_request(text)
    if req.dev is None:
        return cma.alloc_from(req.regions, req.size, req.alignment, uid=uid, pid=pid,
                              **req.options)
    return cma.alloc(req.dev, req.size, req.alignment, req.type, uid=uid, pid=pid,
                     **req.options)


def result_line(chunk: Chunk) -> str:
    """The result line of ``chunk``, as a read of ``alloc`` returns it."""
    return protocol.format_result(chunk.start, chunk.size, chunk.region.name, chunk.label,
                                  chunk.id)
