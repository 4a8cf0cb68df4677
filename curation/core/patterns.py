"""Shard and file patterns as users write them: brace ranges and lists (`{00000..00099}`, `{a,b}`:
open_clip's and webdataset's syntax, and how `curate select` names its tars) and globs (`*.tar`).

One expansion for every place a user names files (`input.path`, `data.shards`, `--retrieval`,
`mine --shards`), so a pattern that works in one works in all.
"""

from __future__ import annotations

from collections.abc import Sequence

import braceexpand


def brace_expand(pattern: str) -> list[str]:
    """`dir/{00000..00002}.tar` -> the three names, in order; a pattern without braces -> itself."""
    return list(braceexpand.braceexpand(pattern))


def has_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def missing_note(found: int, missing: Sequence[str], what: str = "shards") -> str:
    """`6 of 10 shards found (4 missing: a, b, c, +1 more)`: names a pattern spelled out but nobody wrote."""
    shown = ", ".join(missing[:3]) + (f", +{len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{found} of {found + len(missing)} {what} found ({len(missing)} missing: {shown})"
