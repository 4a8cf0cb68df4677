"""caption_language on real LAION captions (--captions; BENCHMARKS.md used a 10k sample): captions/s and the share called English.

Measures the stage as the pipeline runs it (`apply_stage` on one Arrow batch of
all the captions: fastText lid.176.ftz via fasttext-predict) and, for the record,
py3langid (the other PyPI language identifier with its model inside the package):
its speed, its English share and how often the two agree.

    python bench/langid_throughput.py [--captions PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from captions import add_captions_argument  # noqa: E402


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.stages import StageContext, apply_stage
    from curation.stages.caption_language import CaptionLanguage, CaptionLanguageParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_captions_argument(ap)
    args = ap.parse_args()
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    captions = pq.read_table(args.captions, columns=["TEXT"]).column("TEXT")
    table = pa.table({"caption": captions})
    stage = CaptionLanguage(CaptionLanguageParams(), StageContext(Path(".")))
    start = time.perf_counter()
    stage.setup()
    load = time.perf_counter() - start
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        out = apply_stage(stage, table)
        rates.append(len(table) / (time.perf_counter() - start))
    langs = out.column("caption_lang").to_pylist()
    english = sum(lang == "en" for lang in langs) / len(langs)
    top = sorted({lang: langs.count(lang) for lang in set(langs)}.items(), key=lambda kv: -kv[1])[:6]
    print(
        f"fastText lid.176.ftz: {statistics.median(rates):,.0f} captions/s (median of 3: "
        f"{', '.join(f'{r:,.0f}' for r in rates)}), model load {1000 * load:.0f} ms; "
        f"English {100 * english:.1f}% of {len(langs):,}; kept by languages [en]: "
        f"{out.column('keep').to_pylist().count(True):,}; top labels {top}"
    )

    import py3langid

    texts = [c or "" for c in captions.to_pylist()]
    start = time.perf_counter()
    other = [py3langid.classify(t)[0] for t in texts]
    rate = len(texts) / (time.perf_counter() - start)
    agree = sum(a == b for a, b in zip(langs, other) if a is not None) / sum(a is not None for a in langs)
    print(
        f"py3langid: {rate:,.0f} captions/s, English {100 * other.count('en') / len(other):.1f}%; "
        f"agrees with fastText on {100 * agree:.1f}% of captions"
    )
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
