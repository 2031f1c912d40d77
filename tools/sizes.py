"""`make lint`'s size rule: no function over 60 lines, no module over 400.

A file or function that must be larger is named in LARGER with the reason;
docs/development.md lists them.  Anything else over the limits fails.
"""

from __future__ import annotations

import ast
import pathlib
import sys

MAX_FUNCTION = 60
MAX_MODULE = 400
ROOTS = ("cmad", "fusefs")

# path or path:function -> why it is larger, for now
LARGER = {
    "cmad/core/cma.py": "the allocation path (hot, kept inline) and region/allocator management",
}


def offenders(root: pathlib.Path) -> list[str]:
    out = []
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            text = path.read_text()
            lines = len(text.splitlines())
            if lines > MAX_MODULE and rel not in LARGER:
                out.append(f"{rel}: {lines} lines (at most {MAX_MODULE})")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION and f"{rel}:{node.name}" not in LARGER:
                        out.append(f"{rel}:{node.lineno} {node.name}: {length} lines "
                                   f"(at most {MAX_FUNCTION})")
    return out


def main() -> int:
    found = offenders(pathlib.Path(__file__).resolve().parent.parent)
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
