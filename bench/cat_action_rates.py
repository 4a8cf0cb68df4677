"""Pass rates of the CAT caption checks under both action rules (docs/methods.md §1b).

    python bench/cat_action_rates.py                                  # the committed 1k captions
    python bench/cat_action_rates.py --captions laion_captions_10k.parquet

DiHT kept ~23% of LAION after complexity, action and text spotting; the caption checks run
first, so the rule that matches the paper must keep more than that on its own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from captions import add_captions_argument

from curation.stages.caption import CaptionScorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_captions_argument(ap)
    args = ap.parse_args()
    scores = CaptionScorer().score(pq.read_table(args.captions, columns=["TEXT"]).column("TEXT").to_pylist())
    complex_ = scores["caption_complexity"] >= 2
    n = len(complex_)
    rows = {
        "caption_complexity >= 2": complex_,
        "+ caption_verbs >= 1 (count: verbs, default)": complex_ & (scores["caption_verbs"] >= 1),
        "+ caption_actions >= 1 (count: actions)": complex_ & (scores["caption_actions"] >= 1),
    }
    print(f"{args.captions.name}: {n:,} captions")
    for label, kept in rows.items():
        print(f"  {label:<46} {100 * kept.sum() / n:5.1f}%  ({int(kept.sum()):,})")


if __name__ == "__main__":
    main()
