"""Ray runner scaling: local vs Ray on the same cores, Ray on 1 vs 2 CPUs, start-up, driver memory.

    python bench/ray_scaling.py                     # 500k captions (--captions replicated; BENCHMARKS.md used a 10k LAION sample)
    python bench/ray_scaling.py --rows 100000 --small-rows 20000

Every measurement runs in a fresh process (so its peak RSS is its own) over the
caption pipeline (caption_complexity + caption_action), into a new output
directory. Ray runs go inside a private network namespace where one can be
made (`--netns auto`): Ray 2.60 binds to the host's address, and this keeps
it on loopback. Reported:

- rows/s of the processing itself: from the first shard handed out to the last
  one written, worker start-up and model loading included, for both runners
  (`RunSummary.seconds`);
- Ray start-up (`ray.init` of a local instance) separately;
- the driver's peak RSS for two input sizes (it should not grow with input);
- for the local runner, rows per CPU-second (driver + worker processes),
  which does not depend on what else the machine runs. Not for Ray: its
  workers are reaped by the raylet without their CPU time reaching any
  ancestor, and they exit before the run returns, so a /proc sum undercounts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from captions import add_captions_argument  # noqa: E402

STAGES = "  - caption_complexity: {min: 2}\n  - caption_action: {min: 1}\n"


def make_input(src: Path, rows: int, dest: Path) -> Path:
    """`rows` rows of `src` repeated whole, each copy with distinct URLs (unique uids).

    Copies are whole multiples of the source, and shards and batches align with
    them, so no batch holds the same caption twice (the caption scorer parses a
    repeated caption once per batch, which would flatter the numbers).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(src, columns=["URL", "TEXT"])
    path = dest / f"captions_{rows}.parquet"
    with pq.ParquetWriter(path, t.schema) as w:
        left, k = rows, 0
        while left > 0:
            part = t.slice(0, min(left, t.num_rows))
            urls = pa.array([f"{u}#{k}" for u in part.column("URL").to_pylist()])
            w.write_table(part.set_column(0, "URL", urls), row_group_size=part.num_rows)
            left -= part.num_rows
            k += 1
    return path


def write_config(data: Path, out: Path, shard_rows: int, batch_rows: int) -> Path:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(
        f"input: {{path: {data}, url_column: URL, caption_column: TEXT, rows_per_shard: {shard_rows}}}\n"
        f"output: {out}\n"
        f"runner: {{progress: false, batch_rows: {batch_rows}}}\n"
        f"stages:\n{STAGES}"
    )
    return cfg


# ---------------------------------------------------------------------------- one measurement (child)


def _cpu_seconds_self_and_children() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb() -> float:
    """This process's own peak (VmHWM): ru_maxrss would carry the parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure(cfg_path: str, runner: str, cpus: int) -> dict:
    from curation.config import load_config
    from curation.engine import execute
    from curation.stages import STAGES

    config = load_config(cfg_path, stages=STAGES, overrides={"runner.type": runner, "runner.workers": cpus})
    ray_start = None
    if runner == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
    cpu0 = _cpu_seconds_self_and_children()
    t0 = time.perf_counter()
    summary = execute(config)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds_self_and_children() - cpu0 if runner == "local" else None
    if runner == "ray":
        import ray

        ray.shutdown()
    assert summary.ok and summary.rows, summary
    return {
        "runner": runner,
        "cpus": cpus,
        "rows": summary.rows,
        "seconds": summary.seconds,
        "rows_per_s": summary.rows / summary.seconds,
        "execute_wall_s": wall,
        "cpu_s": cpu,
        "rows_per_cpu_s": summary.rows / cpu if cpu else None,
        "ray_start_s": ray_start,
        "driver_peak_rss_mb": _peak_rss_mb(),
    }


# ---------------------------------------------------------------------------- orchestration (parent)


def netns_prefix(mode: str) -> list[str]:
    if mode == "never" or not (shutil.which("unshare") and shutil.which("ip")):
        if mode == "always":
            sys.exit("--netns always: unshare/ip not found")
        return []
    for flags in (["-n"], ["-rn"]):
        if (
            subprocess.run(
                ["unshare", *flags, "ip", "link", "set", "lo", "up"], capture_output=True
            ).returncode
            == 0
        ):
            return ["unshare", *flags, "sh", "-c", 'ip link set lo up && exec "$@"', "netns"]
    if mode == "always":
        sys.exit("--netns always: cannot create a network namespace")
    return []


def run_child(cfg: Path, runner: str, cpus: int, netns: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cmd = [sys.executable, __file__, "_measure", str(cfg), runner, str(cpus)]
    if runner == "ray" and netns:
        cmd = [*netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"measurement failed ({runner}, {cpus} cpu):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(cfg.with_suffix(""), ignore_errors=True)  # the output: only the numbers matter
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_measure":
        _, _, cfg, runner, cpus = sys.argv
        print(json.dumps(measure(cfg, runner, int(cpus))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_captions_argument(p)
    p.add_argument("--rows", type=int, default=500_000, help="input rows for the throughput runs")
    p.add_argument("--small-rows", type=int, default=100_000, help="second input size for driver memory")
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--batch-rows", type=int, default=2_000)
    p.add_argument("--cpus", type=int, default=2, help="cores for the local-vs-Ray comparison")
    p.add_argument("--netns", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--json", type=Path, help="also write all results here")
    args = p.parse_args(argv)

    netns = netns_prefix(args.netns)
    tmp = Path(tempfile.mkdtemp(prefix="curate-bench-"))
    results: dict[str, dict] = {}
    try:
        big = make_input(args.captions, args.rows, tmp)
        small = make_input(args.captions, args.small_rows, tmp)

        def run(name: str, data: Path, runner: str, cpus: int) -> None:
            cfg = write_config(data, tmp / name, args.shard_rows, args.batch_rows)
            r = results[name] = run_child(cfg, runner, cpus, netns)
            start = f", ray start {r['ray_start_s']:.1f} s" if r["ray_start_s"] is not None else ""
            if r["rows_per_cpu_s"]:
                start += f"; {r['rows_per_cpu_s']:,.0f} rows/CPU-s"
            print(
                f"{name:<22} {r['rows']:>9,} rows  {r['rows_per_s']:>8,.0f} rows/s  "
                f"({r['seconds']:.1f} s{start}; driver peak RSS {r['driver_peak_rss_mb']:.0f} MB)",
                flush=True,
            )

        load = os.getloadavg()[0]
        print(
            f"caption pipeline, {os.cpu_count()} cores here, load average {load:.1f}; Ray in a netns: {bool(netns)}"
        )
        run(f"local_{args.cpus}cpu", big, "local", args.cpus)
        run(f"ray_{args.cpus}cpu", big, "ray", args.cpus)
        run("ray_1cpu", big, "ray", 1)
        run(f"ray_{args.cpus}cpu_small", small, "ray", args.cpus)
        run(f"local_{args.cpus}cpu_small", small, "local", args.cpus)

        loc, ray2, ray1 = (
            results[f"local_{args.cpus}cpu"],
            results[f"ray_{args.cpus}cpu"],
            results["ray_1cpu"],
        )
        rs = results[f"ray_{args.cpus}cpu_small"]
        print()
        print(
            f"Ray / local, {args.cpus} CPUs:        {ray2['rows_per_s'] / loc['rows_per_s']:.2f}x (target >= 0.9)"
        )
        print(
            f"Ray {args.cpus} CPUs / Ray 1 CPU:      {ray2['rows_per_s'] / ray1['rows_per_s']:.2f}x (target >= 1.7)"
        )
        starts = [r["ray_start_s"] for r in results.values() if r["ray_start_s"] is not None]
        print(f"Ray start-up (ray.init):     {min(starts):.1f}-{max(starts):.1f} s over {len(starts)} starts")
        print(
            f"Ray driver peak RSS:         {rs['driver_peak_rss_mb']:.0f} MB at {rs['rows']:,} rows, "
            f"{ray2['driver_peak_rss_mb']:.0f} MB at {ray2['rows']:,} rows"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
