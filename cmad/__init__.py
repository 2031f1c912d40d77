"""cmad: a userspace Contiguous Memory Allocator daemon.

The core runs in process: ``from cmad import Cma, CmaError``.  The names are
imported on first use, so ``cmad.clients.client`` and ``cmactl`` start fast.
"""

__version__ = "0.1.0"

__all__ = ["Arena", "Chunk", "Cma", "CmaError", "Info", "__version__"]

_WHERE = {"Arena": "memory.arena", "Chunk": "core.chunks", "Cma": "core.cma", "CmaError": "errors",
          "Info": "core.cma"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'cmad' has no attribute {name!r}")
