"""The core's events (cmad.core.events): tiers, default hooks, veto and undo in one place."""

import errno

import pytest

from cmad import Arena, Cma, CmaError
from cmad.core.events import DURABLE, Listener

M = 1 << 20


class Log(Listener):
    """Writes every event it hears to a shared list, tagged with its name."""

    def __init__(self, name, seen, tier=None):
        self.name, self.seen = name, seen
        if tier is not None:
            self.tier = tier

    def on_alloc(self, chunk):
        self.seen.append((self.name, "alloc", chunk.start))

    def on_free(self, chunk):
        self.seen.append((self.name, "free", chunk.start))

    def on_move(self, chunk, old_start):
        self.seen.append((self.name, "move", old_start, chunk.start))


class VetoMoves(Listener):
    def on_move(self, chunk, old_start):
        raise CmaError(errno.ENOSPC, "state disk full")


def test_a_durable_listener_is_told_first_whenever_it_was_added():
    cma = Cma("r=16M:bf", "*=r")
    seen = []
    cma.listeners.append(Log("view", seen))
    cma.listeners.append(Log("journal", seen, tier=DURABLE))
    c = cma.alloc("d", M)
    cma.free(c.start)
    assert [(who, what) for who, what, *_ in seen] == [
        ("journal", "alloc"), ("view", "alloc"), ("journal", "free"), ("view", "free")]


def test_a_listener_gets_the_default_of_every_hook_it_leaves_out():
    cma = Cma("r=16M:bf(pageblock=0)", "*=r")

    class AllocOnly:  # not a Listener: adopted, the rest are the defaults
        def on_alloc(self, chunk):
            pass

    cma.listeners.append(AllocOnly())
    cma.listeners.append(Listener())
    c = cma.alloc("d", M, movable=True)
    cma.pin(c)                      # on_move
    cma.catch_up()
    cma.free(c.start)
    cma.set_allocator("r", "buddy")  # on_allocator
    assert cma.region("r").alloc_text == "buddy"


def test_a_vetoed_move_is_undone_for_the_listeners_already_told(tmp_path):
    cma = Cma("r=16M:bf(pageblock=0)", "*=r", arena=Arena(16 * M))
    seen = []
    movers = [cma.alloc("d", M, movable=True) for _ in range(16)]
    for c in movers[::2]:
        cma.free(c.start)
    cma.listeners.append(Log("journal", seen, tier=DURABLE))
    cma.listeners.append(VetoMoves())
    starts = {c.id: c.start for c in cma.chunks}
    with pytest.raises(CmaError) as e:
        cma.alloc("d", 2 * M)
    assert e.value.errno == errno.ENOSPC
    assert {c.id: c.start for c in cma.chunks} == starts
    moves = [event for event in seen if event[1] == "move"]
    assert len(moves) == 2, "told of the move, then of the move back"
    (_, _, old, new), (_, _, back_from, back_to) = moves
    assert (back_from, back_to) == (new, old)
    cma._check()


def test_a_vetoed_pin_leaves_the_chunk_movable():
    cma = Cma("r=16M:bf", "*=r")
    c = cma.alloc("d", M, movable=True)
    cma.listeners.append(VetoMoves())
    with pytest.raises(CmaError):
        cma.pin(c)
    assert c.movable and cma.region("r").movable_users == 1
    cma._check()
