"""cmad: a userspace Contiguous Memory Allocator daemon.

The core runs in process: ``from cmad import Cma, CmaError``.  The names are
imported on first use, so ``cmad.client`` and ``cmactl`` start fast.
"""

__version__ = "0.1.0"

__all__ = ["Arena", "Chunk", "Cma", "CmaError", "Info", "__version__"]

_WHERE = {"Arena": "arena", "Chunk": "chunks", "Cma": "cma", "CmaError": "errors",
          "Info": "cma"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'cmad' has no attribute {name!r}")
