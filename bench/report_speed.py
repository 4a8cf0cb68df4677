"""`curate report` wall time on a 1M-row caption output and on the demo image run; HTML size.

Also the HTML size of the default sample (48 per outcome) when every row has an image: 1,000 real
LAION captions paired with 256 px JPEG crops of scikit-image's photos, as webdataset input.

    python bench/report_speed.py                 # ~2 min on 2 cores: builds the outputs, 3 rounds each
    python bench/report_speed.py --rounds 1 --skip-images --skip-thumbnails

The 1M-row output: `curate run` with the CAT caption stages over the 10k real
LAION captions of --captions (BENCHMARKS.md: a 10k sample; real scores, real run.json and ledger), then
replicated 100x into 10 shards of 100k rows with fresh uids, written with the
run machinery itself (RunDir + ShardWriter: the manifest schema, zstd, ledger).
Parsing 1M captions would take ~17 min of both cores here and give the same
columns, types and distributions; the report's cost depends on rows and
columns, not on how the scores were made.

Baseline, measured in the same run on the same output: `curate stats` (the text
summary, which reads the same manifests). Target: report < 10 s on 1M rows.
Every figure is a subprocess wall time, interpreter start included (what a user waits for).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.rundir import RunDir  # noqa: E402
from curation.schema import make_uids  # noqa: E402
from curation.sources.base import Shard  # noqa: E402
from tests.helpers import write_config  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from captions import add_captions_argument  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}


CPU: dict[str, list[float]] = {}  # CPU seconds (user + sys) per command label: less sensitive to load


def curate(*args: str, label: str | None = None) -> float:
    """Wall seconds of one `curate` command (a fresh interpreter, as a user runs it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "curation.cli", *args], check=True, env=ENV, stdout=subprocess.DEVNULL
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if label:
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        CPU.setdefault(label, []).append(cpu)
    return wall


def scored_10k(tmp: Path, captions: Path) -> Path:
    out = tmp / "laion10k"
    cfg = write_config(tmp / "laion10k.yaml", captions, out, rows_per_shard=5000, workers=2)
    curate("run", str(cfg))
    return out


def replicate(src: Path, dst: Path, copies: int, shards: int) -> int:
    """`copies` x the scored rows of `src`, fresh uids, in `shards` committed shards of `dst`."""
    table = pq.read_table(src / "manifests")
    record = RunDir(src).record()
    rows = table.num_rows * copies
    per = rows // shards
    plan = [Shard(k, f"replicated:{k}", k * per, (k + 1) * per) for k in range(shards)]
    run = RunDir(dst)
    run.prepare(record["fingerprint"], record["config_hash"] + "-x100", plan, record["stages"])
    schema = pq.read_schema(next((src / "manifests").glob("shard-*.parquet")))
    urls = table.column("url").to_pylist()
    copy = 0
    for shard in plan:
        writer = run.writer(shard.index, schema)
        for _ in range(per // table.num_rows):
            # Fresh uids and urls per copy, so no uid repeats (as in a real 1M-row input).
            new_urls = [f"{u}#{copy}" for u in urls]
            part = table.set_column(
                table.schema.get_field_index("url"), "url", pa.array(new_urls, pa.string())
            )
            part = part.set_column(
                part.schema.get_field_index("uid"),
                "uid",
                make_uids(new_urls, table.column("caption").to_pylist()),
            )
            part = part.set_column(
                part.schema.get_field_index("shard"),
                "shard",
                pa.array([shard.index] * part.num_rows, pa.int32()),
            )
            writer.write(part)
            copy += 1
        writer.commit()
    return rows


def photo_pairs(tmp: Path, n: int = 1000) -> Path:
    """A webdataset tar of `n` real captions with distinct 256 px JPEG photos (crops of skimage's)."""
    import io
    import random
    import tarfile

    import skimage.data
    from PIL import Image

    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "hubble_deep_field", "retina"]
    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names]
    captions = pq.read_table(REPO / "data" / "laion_captions_1k.parquet").column("TEXT").to_pylist()
    rng = random.Random(0)
    path = tmp / "photos" / "part-0.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for k in range(n):
            photo = photos[k % len(photos)]
            side = rng.randint(min(photo.size) // 3, min(photo.size))
            x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
            buf = io.BytesIO()
            photo.crop((x, y, x + side, y + side)).resize((256, 256)).save(buf, "JPEG", quality=95)
            for name, data in (
                (f"{k:06d}.jpg", buf.getvalue()),
                (f"{k:06d}.txt", (captions[k] or "").encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cfg = tmp / "photos.yaml"
    cfg.write_text(
        f"""input: {{format: webdataset, path: "{path}", rows_per_shard: 500}}
output: {tmp / "photos_run"}
runner: {{type: local, workers: 2, progress: false}}
stages: [{{caption_complexity: {{min: 2}}}}, {{caption_action: {{min: 1}}}}]
"""
    )
    curate("run", str(cfg))
    return tmp / "photos_run"


def measure(label: str, commands: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(rounds):
        for name, args in commands.items():  # interleaved: load changes hit every command alike
            times[name].append(curate(*args, label=f"{label}: {name}"))
        print(
            f"  {label} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
            flush=True,
        )
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=100, help="replicas of the 10k scored rows (100: 1M rows)")
    ap.add_argument("--skip-images", action="store_true", help="skip the demo image run (OCR on 34 pairs)")
    ap.add_argument("--skip-thumbnails", action="store_true", help="skip the 1,000-photo run (HTML size)")
    ap.add_argument("--workdir", help="keep the outputs here (default: a temporary folder)")
    add_captions_argument(ap)
    args = ap.parse_args()
    print("load average at start:", Path("/proc/loadavg").read_text().strip())
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = Path(tmp_name)
        t = time.perf_counter()
        src = scored_10k(tmp, args.captions)
        big = tmp / "laion1m"
        rows = replicate(src, big, args.copies, shards=10)
        print(
            f"built {rows:,} rows in {time.perf_counter() - t:.0f} s ({sum(f.stat().st_size for f in (big / 'manifests').glob('*.parquet')) / 1e6:.0f} MB of manifests)"
        )
        html = tmp / "laion1m.html"
        where = "caption_complexity BETWEEN 2 AND 3"
        times = measure(
            f"{rows:,} rows",
            {
                "stats": ["stats", str(big)],
                "report": ["report", str(big), "--out", str(html)],
                "report --where": ["report", str(big), "--out", str(tmp / "where.html"), "--where", where],
            },
            args.rounds,
        )
        med = {k: statistics.median(v) for k, v in times.items()}
        results["caption_1m"] = {
            "rows": rows,
            "seconds": times,
            "median": med,
            "report_over_stats": med["report"] / med["stats"],
            "html_bytes": html.stat().st_size,
            "html_bytes_where": (tmp / "where.html").stat().st_size,
        }
        print(
            f"1M caption rows: report {med['report']:.2f} s (target < 10 s), --where {med['report --where']:.2f} s, "
            f"stats {med['stats']:.2f} s; report/stats {med['report'] / med['stats']:.2f}x; "
            f"HTML {html.stat().st_size / 1e6:.2f} MB"
        )
        if not args.skip_images:
            demo = tmp / "demo_images"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "curation.cli",
                    "run",
                    "pipelines/demo_images.yaml",
                    "-o",
                    str(demo),
                    "--no-progress",
                ],
                check=True,
                env=ENV,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
            )
            dhtml = tmp / "demo.html"
            times = measure(
                "demo images",
                {"stats": ["stats", str(demo)], "report": ["report", str(demo), "--out", str(dhtml)]},
                args.rounds,
            )
            med = {k: statistics.median(v) for k, v in times.items()}
            results["demo_images"] = {"seconds": times, "median": med, "html_bytes": dhtml.stat().st_size}
            print(
                f"demo image run (34 pairs, 20 thumbnails): report {med['report']:.2f} s, stats {med['stats']:.2f} s; HTML {dhtml.stat().st_size / 1e6:.2f} MB"
            )
        if not args.skip_thumbnails:
            photos = photo_pairs(tmp)
            phtml = tmp / "photos.html"
            times = measure(
                "1,000 photos", {"report": ["report", str(photos), "--out", str(phtml)]}, args.rounds
            )
            text = phtml.read_text()
            thumbs = text.count('<img src="data:image/jpeg;base64,')
            results["photos_1k"] = {
                "seconds": times["report"],
                "median": statistics.median(times["report"]),
                "html_bytes": phtml.stat().st_size,
                "thumbnails": thumbs,
            }
            print(
                f"1,000 photo pairs, default sample: {thumbs} thumbnails, HTML {phtml.stat().st_size / 1e6:.2f} MB, "
                f"report {statistics.median(times['report']):.2f} s"
            )
    for label, cpu in CPU.items():
        print(
            f"CPU seconds, {label}: median {statistics.median(cpu):.2f} ({', '.join(f'{c:.2f}' for c in cpu)})"
        )
    results["cpu_seconds"] = CPU
    print("load average at end:", Path("/proc/loadavg").read_text().strip())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
