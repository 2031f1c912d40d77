"""The pluggable part of the core: the allocator interface and the allocators.

- ``interface``: the ``Allocator`` base class (the patch's ``struct
  cma_allocator``) and the registry;
- ``bf``, ``buddy``, ``bitmap``: one module per built-in allocator;
- ``pageblocks``: grouping by mobility, the shared machinery that wraps any
  allocator in pageblocks of one mobility type each (SPEC 4b): the policy
  (the request path) there, the block table it works on in ``blocks``.
"""

from cmad.allocators.interface import (BUILTIN, PAGE_SHIFT, PAGE_SIZE, Allocator, Factory,
                                      register, registry)

__all__ = ["BUILTIN", "PAGE_SHIFT", "PAGE_SIZE", "Allocator", "Factory", "register", "registry"]
