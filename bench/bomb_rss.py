"""Peak memory of the download stage over a decompression bomb vs a normal image (issue 11).

    python bench/bomb_rss.py             # ~1 minute

Each case is one `curate run` of a download-only pipeline over one pair, in a fresh
process with one worker (so the download runs in the process that is measured), served
by a real HTTP server on 127.0.0.1. Peak RSS is the process's VmHWM.

  normal      a 1024 x 768 JPEG
  bomb        a 30000 x 30000 PNG (875 KB on disk, 900 megapixels): refused from its header
  decoded     a 10000 x 10000 PNG (100 MP) with max_pixels raised to 10^9, so img2dataset
              decodes it: what the header check saves (a 30000 x 30000 one cannot be let
              through this way, Pillow itself stops at 2 x 89.5 MP)

Target: peak RSS bomb / normal <= 1.2.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.imageserver import ImageServer, png_bomb  # noqa: E402

CAPTION = "A man rides a red bicycle down the street."


def peak_rss_mb(cfg: Path) -> tuple[float, str]:
    """Peak RSS (MB) of `curate run CONFIG` in a fresh process, and the row's download status."""
    code = (
        "import sys; from curation.cli import main; "
        f"rc = main(['run', {str(cfg)!r}]); "
        "hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]); "
        "print('HWM', hwm); sys.exit(rc)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    hwm = int(next(ln for ln in p.stdout.splitlines() if ln.startswith("HWM")).split()[1])
    out = Path(cfg.read_text().split("output: ", 1)[1].split("\n", 1)[0])
    status = pq.read_table(out / "manifests", columns=["status"]).column("status")[0].as_py()
    return hwm / 1024, status


def write_case(tmp: Path, name: str, url: str, extra: str = "") -> Path:
    pq.write_table(pa.table({"url": [url], "caption": [CAPTION]}), tmp / f"{name}.parquet")
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        f"input: {{path: {tmp / (name + '.parquet')}}}\n"
        f"output: {tmp / name}\n"
        "runner: {workers: 1, progress: false}\n"
        f"stages:\n  - download: {{allow_private_addresses: [127.0.0.1/32]{extra}}}\n"
    )
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    normal = io.BytesIO()
    Image.new("RGB", (1024, 768), (120, 30, 200)).save(normal, format="JPEG", quality=90)
    with tempfile.TemporaryDirectory() as d, ImageServer() as server:
        tmp = Path(d)
        server.files["/normal.jpg"] = normal.getvalue()
        server.files["/bomb.png"] = png_bomb(30_000, 30_000)
        server.files["/big.png"] = png_bomb(10_000, 10_000)
        print(f"bomb: {len(server.files['/bomb.png']):,} bytes on disk, 30000 x 30000 pixels", flush=True)
        cases = {
            "normal": ("/normal.jpg", ""),
            "bomb": ("/bomb.png", ""),
            "decoded": ("/big.png", ", max_pixels: 1000000000"),
        }
        peaks: dict[str, list[float]] = {name: [] for name in cases}
        ratios = []
        for r in range(args.rounds):
            for name, (path, extra) in cases.items():
                cfg = write_case(tmp, f"{name}{r}", server.url(path), extra)
                mb, status = peak_rss_mb(cfg)
                peaks[name].append(mb)
                print(f"round {r + 1} {name:8s} peak RSS {mb:7.0f} MB  status={status}", flush=True)
            ratios.append(peaks["bomb"][-1] / peaks["normal"][-1])
    med = {name: statistics.median(v) for name, v in peaks.items()}
    print()
    print(f"median peak RSS: normal {med['normal']:.0f} MB, bomb {med['bomb']:.0f} MB, "
          f"10000^2 decoded {med['decoded']:.0f} MB")  # fmt: skip
    print(f"bomb / normal: {statistics.median(ratios):.3f}x (per round: {', '.join(f'{x:.3f}' for x in ratios)}); "
          "target <= 1.2")  # fmt: skip


if __name__ == "__main__":
    main()
