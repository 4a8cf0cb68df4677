"""Printing for people: untrusted text made inert, and a reader that goes away.

Captions, URLs and file names come from the web. Printed raw, an ESC starts a
terminal escape sequence (colours, cursor moves, window titles; some terminals
have had worse), a bidi override reorders what is shown, and a NUL or newline
breaks the table. `printable` shows each such character as an escape instead.
It is for what people read (tables, messages); machine formats (csv, json,
parquet) keep the data exact.
"""

from __future__ import annotations

import re
import select
import sys

# C0 controls (tab and newline too: they break a table's rows and columns), DEL, C1 controls,
# and the Unicode bidi overrides/isolates and line/paragraph separators.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with control characters and bidi overrides shown as escapes (`\\x1b`, `\\u202e`)."""
    return _UNPRINTABLE.sub(_escape, text)


def rate(per_second: float) -> str:
    """A rate people can read at any scale: `1,234`, `12.3`, `0.44` (never `0` for a slow stage)."""
    if per_second >= 100:
        return f"{per_second:,.0f}"
    if per_second >= 0.01 or per_second == 0:
        return f"{per_second:.3g}"
    return f"{per_second:.1e}"


def stdout_is_broken() -> bool:
    """True when stdout is a pipe whose reader has gone (`curate query ... | head -1`)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # stdout closed or not a real file
        return False
