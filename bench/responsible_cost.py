"""Per-image cost of the responsible-curation stages against the download itself, in one process.

- download: the `download` stage (img2dataset, 16 threads, resize to 256 px, JPEG) fetching real
  photos (scikit-image's, cropped to 480 x 360 JPEGs) from a server on 127.0.0.1: a lower bound
  of a real download (no network latency), so the ratios below are upper bounds;
- blocklist screen, digests: what the download's screen adds per fetched image with MD5 and
  SHA-256 lists of 100,000 entries each (two digests and two set look-ups);
- blocklist screen, + PDQ: the same plus a PDQ list of 100,000 hashes (decode, PDQ, brute-force
  Hamming distances);
- faces: the faces stage on the downloaded 256 px images;
- phash: the phash stage (decontamination's pool hash) on the same images, for reference.

Medians of --repeats runs over --images images; prints ms per image and the ratio to the download.

    nice python bench/responsible_cost.py --images 200 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import skimage.data
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.stages.base import StageContext, apply_stage
from curation.stages.blocklist import Blocklists
from curation.stages.download import Download, DownloadParams
from curation.stages.faces import Faces, FacesParams
from curation.stages.phash import Phash, PhashParams
from tests.imageserver import ImageServer


def photos(n: int) -> list[bytes]:
    sources = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    out = []
    for i in range(n):
        a = sources[i % 4]
        y, x = (i * 7) % (a.shape[0] - 360), (i * 11) % (a.shape[1] - 480 if a.shape[1] > 480 else 1)
        buf = io.BytesIO()
        Image.fromarray(a[y : y + 360, x : x + 480]).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def lists(folder: Path, n: int) -> dict[str, list[tuple[str, str]]]:
    rng = np.random.default_rng(0)
    paths: dict[str, list[tuple[str, str]]] = {}
    for kind, digits in (("md5", 32), ("sha256", 64), ("pdq", 64)):
        path = folder / f"{kind}.txt"
        path.write_text("\n".join(rng.bytes(digits // 2).hex() for _ in range(n)) + "\n")
        paths[kind] = [(path.name, str(path))]
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--list-size", type=int, default=100_000)
    args = ap.parse_args()
    data = photos(args.images)
    results: dict[str, list[float]] = {k: [] for k in ("download", "digests", "pdq", "faces", "phash")}
    with tempfile.TemporaryDirectory() as tmp, ImageServer() as server:
        tmp = Path(tmp)
        for i, d in enumerate(data):
            server.files[f"/p/{i}.jpg"] = d
        digest_lists = Blocklists(
            {k: v for k, v in lists(tmp, args.list_size).items() if k != "pdq"}, 31, 10**8
        )
        pdq_lists = Blocklists(lists(tmp, args.list_size), 31, 10**8)
        table = pa.table(
            {
                "uid": [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(args.images)],
                "shard": pa.array([0] * args.images, pa.int32()),
                "url": [server.url(f"/p/{i}.jpg") for i in range(args.images)],
                "caption": ["a photo"] * args.images,
            }
        )
        context = StageContext(output_dir=tmp / "out")
        faces, phash = Faces(FacesParams(), context), Phash(PhashParams(), context)
        faces.setup()
        for r in range(args.repeats):
            download = Download(
                DownloadParams(thread_count=16, timeout=10, allow_private_addresses=["127.0.0.1/32"]), context
            )
            download.setup()
            batch = table.set_column(
                0, "uid", pa.array([f"{u[:28]}{r:04d}" for u in table.column("uid").to_pylist()])
            )
            start = time.perf_counter()
            done = apply_stage(download, batch)
            results["download"].append(time.perf_counter() - start)
            downloaded = done.select(["uid", "shard", "url", "caption", "image"])
            assert downloaded.column("image").null_count == 0
            results["digests"].append(timed(lambda: [digest_lists.match_bytes(d) for d in data]))
            results["pdq"].append(timed(lambda: [pdq_lists.match_bytes(d) for d in data]))
            results["faces"].append(timed(lambda t=downloaded: faces.compute(t)))
            results["phash"].append(timed(lambda t=downloaded: phash.compute(t)))
    base = statistics.median(results["download"]) / args.images * 1000
    print(f"{args.images} images x {args.repeats} repeats, lists of {args.list_size:,} entries")
    print(f"{'step':<34}{'ms/image (median)':>18}{'x download':>12}")
    names = {
        "download": "download (127.0.0.1, resize 256)",
        "digests": "blocklist screen: md5+sha256",
        "pdq": "blocklist screen: + PDQ",
        "faces": "faces (256 px)",
        "phash": "phash (256 px)",
    }
    for key, label in names.items():
        ms = statistics.median(results[key]) / args.images * 1000
        print(f"{label:<34}{ms:>18.2f}{ms / base:>12.2f}")


if __name__ == "__main__":
    main()
