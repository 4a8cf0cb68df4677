"""Opt-outs and per-host politeness in download (issue 25): their per-image cost against the download.

    PYTHONPATH=. NO_ALBUMENTATIONS_UPDATE=1 nice -n 10 python bench/optouts_throughput.py --images 2000 --repeats 5

A server farm of --hosts sites on 127.0.0.2, 127.0.0.3, ... (in its own process, so it does not share
this process's GIL), each with a robots.txt of a few rules for other paths and agents, no tdmrep.json
(404), small JPEGs under /img/. The download stage's `compute` runs in this process over --images rows
spread round-robin over the hosts, one img2dataset job of --threads threads, in turns:

  today    the stage as it was before issue 25: no gate (img2dataset's User-Agent and X-Robots-Tag check)
  checks   robots.txt + TDMRep + X-Robots-Tag + the gate with no limit that the run can hit
           (host_max_concurrent and host_max_rate null): the cost of the checks themselves
  defaults the stage's defaults (4 in flight and 10 requests/s per host): what a run gets out of the box

Prints images/s per variant (median of --repeats, turns alternating), checks/today (target >= 0.9), and
the checks' own cost per image: `HostGate.admit` for a cached origin (robots.txt and tdmrep.json rules
looked up, slot taken and given back), timed alone over many calls, against today's wall time per image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.stages.base import StageContext
from curation.stages.download import Download, DownloadParams

SERVERS = """
import sys, time
from tests.imageserver import ImageServer
servers = [ImageServer(host=f"127.0.0.{2 + i}").__enter__() for i in range(int(sys.argv[1]))]
robots = "User-agent: *\\nDisallow: /private/\\nDisallow: /cgi-bin/\\n\\nUser-agent: otherbot\\nDisallow: /\\n"
for s in servers:
    s.responses["/robots.txt"] = (200, {"Content-Type": "text/plain"}, robots.encode())
print(" ".join(f"{s.host}:{s.port}" for s in servers), flush=True)
sys.stdin.read()
"""


class Today(Download):
    """The download stage as before issue 25: the URL policy's opener with no gate, img2dataset's own
    User-Agent and X-Robots-Tag check."""

    def _downloader(self, output_folder, per):  # type: ignore[no-untyped-def]
        wrapped = super()._downloader(output_folder, per)
        wrapped.downloader.disallowed_header_directives = {"noai", "noimageai", "noindex", "noimageindex"}
        wrapped.gate = None
        return wrapped


def make(cls: type[Download], out: Path, threads: int, **extra) -> Download:
    params = DownloadParams(thread_count=threads, image_size=64, allow_private_addresses=True, **extra)
    stage = cls(params, StageContext(output_dir=out))
    stage.setup()
    return stage


def table(hosts: list[str], n: int, round_: int) -> pa.Table:
    urls = [f"http://{hosts[i % len(hosts)]}/img/r{round_}-{i}.jpg" for i in range(n)]
    return pa.table(
        {
            "uid": [f"{round_}-{i:08d}" for i in range(n)],
            "caption": ["a photo"] * n,
            "url": urls,
            "shard": pa.array([round_] * n, pa.int64()),
        }
    )


def admit_cost(stage: Download, host: str, calls: int) -> float:
    """Seconds per `HostGate.admit` + slot release for a cached origin (robots.txt and tdmrep.json known)."""
    gate = stage.gate
    req = urllib.request.Request(f"http://{host}/img/warm.jpg")
    gate.admit(req, False)
    for state in gate._take_pending():
        gate._release(state)
    start = time.perf_counter()
    for i in range(calls):
        req = urllib.request.Request(f"http://{host}/img/x{i}.jpg")
        gate.admit(req, False)
        for state in gate._take_pending():
            gate._release(state)
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    repo = Path(__file__).resolve().parents[1]
    farm = subprocess.Popen(
        [sys.executable, "-c", SERVERS, str(args.hosts)],
        cwd=repo,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    hosts = farm.stdout.readline().split()  # type: ignore[union-attr]
    tmp = Path(tempfile.mkdtemp(prefix="optouts-bench-"))
    variants = {
        "today": make(Today, tmp / "today", args.threads),
        "checks": make(Download, tmp / "checks", args.threads, host_max_concurrent=None, host_max_rate=None),
        "defaults": make(Download, tmp / "defaults", args.threads),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    try:
        round_ = 0
        for rep in range(args.repeats + 1):  # the first round warms up (imports, robots.txt fetched)
            for name, stage in variants.items():
                round_ += 1
                t = table(hosts, args.images, round_)
                start = time.perf_counter()
                out = stage.compute(t)
                seconds = time.perf_counter() - start
                ok = out.column("status").to_pylist().count("success")
                assert ok == args.images, (name, out.column("error_message").to_pylist()[:3])
                if rep:
                    rates[name].append(args.images / seconds)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        admit = admit_cost(variants["checks"], hosts[0], 20_000)
    finally:
        farm.stdin.close()  # type: ignore[union-attr]
        farm.wait()
    per_image_today = 1 / medians["today"]
    result = {
        "images_per_s": {k: round(v, 1) for k, v in medians.items()},
        "all_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "checks_over_today": round(medians["checks"] / medians["today"], 3),
        "defaults_over_today": round(medians["defaults"] / medians["today"], 3),
        "admit_us_per_image": round(admit * 1e6, 1),
        "today_ms_per_image": round(per_image_today * 1e3, 2),
        "admit_share_of_download": round(admit / per_image_today, 4),
        "hosts": args.hosts,
        "images": args.images,
        "threads": args.threads,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
