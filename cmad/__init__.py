"""cmad: a userspace Contiguous Memory Allocator daemon.

The core runs in process: ``from cmad import Cma, CmaError``.
"""

__version__ = "0.1.0"

from .errors import CmaError  # noqa: E402
from .cma import Cma, Info  # noqa: E402
from .chunks import Chunk  # noqa: E402
from .arena import Arena  # noqa: E402

__all__ = ["Arena", "Chunk", "Cma", "CmaError", "Info", "__version__"]
