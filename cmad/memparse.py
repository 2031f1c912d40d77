"""The kernel's memparse(), strict, plus the small formatting helpers the tree uses."""

from __future__ import annotations

import re

from cmad.errors import clip, einval

U64_MAX = (1 << 64) - 1
# No literal of a 64-bit value is longer (octal with a suffix is 24); leading
# zeros past this are refused rather than parsed: int() of 5,000 decimal
# digits raises ValueError, and the work would grow with the client's text.
MAX_NUMBER_TEXT = 64

_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
# 0x hex, leading-0 octal (a lone 0 too), else decimal; optional suffix.
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)([KMGTPEkmgtpe]?)")


def memparse(text: str, what: str = "size") -> int:
    """Parse a C integer literal with an optional K M G T P E suffix (powers of 1024).

    Strict where the kernel is lenient: trailing junk, ``0x`` without digits
    and values that do not fit in 64 bits are EINVAL, naming ``what``.
    """
    if len(text) > MAX_NUMBER_TEXT:
        raise einval(f"{what} {clip(text, 24)} is longer than {MAX_NUMBER_TEXT} characters: "
                     "no 64-bit number is")
    m = _NUMBER.fullmatch(text)
    if m is None:
        raise einval(f"{what} {clip(text)} is not a number (C literal with optional "
                     "K/M/G/T/P/E)")
    digits, suffix = m.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    else:
        value = int(digits, 8 if digits[0] == "0" else 10)
    if suffix:
        value <<= _SHIFT[suffix.lower()]
    if value > U64_MAX:
        raise einval(f"{what} {clip(text)} does not fit in 64 bits")
    return value


def fmt_addr(addr: int) -> str:
    """The kernel's 2010 "%p" form: 16 lowercase hex digits, zero padded, no 0x."""
    return f"{addr:016x}"


def align_up(addr: int, alignment: int) -> int:
    """``addr`` rounded up to a multiple of ``alignment`` (a power of two)."""
    return (addr + alignment - 1) & -alignment


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def exact(n: object) -> str:
    """Bytes in the largest binary unit that divides them: 64 MiB, 4 KiB, 6148 KiB,
    4097 B; exact, for log lines and errors about requests.  Anything not a
    64-bit byte count is shown as written, clipped."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 1 << 64:
        text = repr(n)
        return text if len(text) <= 24 else text[:24] + "..."
    for shift, unit in ((50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def human(n: int) -> str:
    """Bytes in the largest binary unit that keeps one decimal: 6.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
