"""The real LAION captions the caption benchmarks read: one `--captions` flag for all of them.

The default is the 1,000 rows committed in data/. BENCHMARKS.md's figures were measured on a
10,000-row LAION sample (url + caption) passed with `--captions PATH`: any Parquet with LAION's
`URL` and `TEXT` columns works.
"""

from __future__ import annotations

import argparse
from pathlib import Path

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "laion_captions_1k.parquet"


def add_captions_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--captions",
        type=Path,
        default=COMMITTED,
        help="Parquet of LAION rows (URL, TEXT columns); default: the 1,000 committed in data/ "
        "(BENCHMARKS.md used a 10,000-row sample)",
    )
