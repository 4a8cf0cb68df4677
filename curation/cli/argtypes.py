"""argparse types shared by every `curate` command: numbers checked where they are parsed.

A bad value is a usage error (exit 2, one line naming the option), never a traceback
later (`--bins 0` used to divide by zero) and never silently ignored.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def workers(text: str) -> int | str:
    """'auto' or an integer; its range is the config's rule (runner.workers), checked there."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def key_value(text: str) -> tuple[str, object]:
    """`--set KEY=VALUE`: a dotted config key and its value read as YAML (`1e-3`, `null`, `[a, b]`)."""
    from curation.core.params import parse_value

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), parse_value(value)


def add_images_from(p: argparse.ArgumentParser) -> None:
    """`--images-from`, shared by `select` and `report` (the run's own output is always allowed)."""
    p.add_argument(
        "--images-from",
        action="append",
        default=[],
        metavar="LOCATION",
        help="a location images may be read from besides the run's own output: the input tars or image "
        "folder of a webdataset/image_folder run (a path or URL; repeat for several). Locations a run's "
        "run.json names are never read on its word: a run directory may come from someone else",
    )
