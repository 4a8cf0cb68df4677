"""`curate dedup`: duplicate groups over a whole run."""

from __future__ import annotations

import argparse
import sys

from curation.cli.common import EXIT_OK, Formatter, fail
from curation.core.terminal import printable

KINDS = ("exact", "phash", "semantic")  # curation.dedup.KINDS, not imported: `curate --help` stays light


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dedup",
        help="find duplicate groups over a whole run (exact, perceptual hash, embeddings); resumable",
        description=(
            "Group the duplicates of OUTPUT (a `curate run` output) over all its finished manifests and write "
            "OUTPUT/dedup/dedup.parquet (uid, dup_group, dup_rank, dup_keep, dup_kind), one row per sample "
            "that has a duplicate. Kinds: exact (same sha256 and cleaned caption), phash (perceptual hashes "
            "at most --radius bits apart; needs the phash stage), semantic (SemDeDup: k-means on "
            "clip_image_embedding, cosine > 1 - --eps within a cluster; needs clip_score with "
            "keep_embedding: true). Each group's representative (dup_keep) is the first by: kept by the "
            "pipeline, highest clip_score, largest original image, smallest uid. Killed, it resumes where "
            "it stopped; re-run on unchanged manifests, it does nothing."
        ),
        epilog=(
            "examples:\n"
            "  curate dedup runs/laion                       # every kind whose columns the run has\n"
            "  curate dedup runs/laion --radius 4 --kinds phash       # stricter, faster\n"
            '  curate query runs/laion "SELECT dup_kind, count(*) FROM dedup GROUP BY 1"\n'
            "  curate select runs/laion --where keep --dedup --out subsets/dedup"
        ),
        formatter_class=Formatter,
    )
    p.add_argument("output", help="a `curate run` output: a directory or a URL (s3://bucket/run)")
    p.add_argument(
        "--radius", type=int, default=6, help="phash: max Hamming distance in bits, 0-16 (default 6)"
    )
    p.add_argument(
        "--eps", type=float, default=0.03, help="semantic: link when cosine > 1 - eps (default 0.03)"
    )
    p.add_argument(
        "--clusters", type=int, help="semantic: k-means clusters (default: one per ~1,000 embeddings)"
    )
    p.add_argument("--iterations", type=int, default=20, help="semantic: k-means iterations (default 20)")
    p.add_argument("--seed", type=int, default=0, help="semantic: k-means seed (default 0)")
    p.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help="comma-separated subset of exact,phash,semantic (default: all; kinds whose columns the run "
        "lacks are skipped with a note)",
    )
    p.add_argument("--force", action="store_true", help="recompute even if the table is up to date")
    p.set_defaults(func=cmd_dedup)


def cmd_dedup(args: argparse.Namespace) -> int:
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        return fail(f"--kinds: unknown kind(s) {unknown or kinds}; choose from {', '.join(KINDS)}")
    from curation.core.outputs import RunLocked
    from curation.core.params import param_problems
    from curation.dedup import DedupError, DedupParams, run_dedup

    params = DedupParams(args.radius, args.eps, args.clusters, args.iterations, args.seed, kinds)
    if problems := param_problems(params):  # the ranges declared on DedupParams
        return fail("; ".join(f"--{name}: {problem}" for name, problem in problems))
    try:
        summary = run_dedup(args.output, params, force=args.force, say=_say)
    except (DedupError, RunLocked) as e:
        return fail(e)
    groups = summary["groups"]
    print(
        f"{summary['rows']:,} rows, {summary['rows_in_groups']:,} in {groups:,} duplicate group(s), "
        f"{summary['rows_in_groups'] - groups:,} redundant; by kind: "
        + ", ".join(f"{k} {n:,}" for k, n in summary["rows_by_kind"].items() if k in kinds)  # those asked for
        + printable(f" -> {args.output.rstrip('/')}/dedup/dedup.parquet")
    )
    return EXIT_OK


def _say(msg: str) -> None:
    print(f"dedup: {printable(msg)}", file=sys.stderr, flush=True)
