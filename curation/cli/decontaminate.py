"""`curate decontaminate`: pool images that are near-copies of evaluation images."""

from __future__ import annotations

import argparse
import sys

from curation.cli.common import EXIT_OK, Formatter, fail
from curation.core.terminal import printable


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "decontaminate",
        help="find pool images that are near-copies of evaluation images; select leaves them out",
        description=(
            "Hash the images of each EVAL (an image folder, a webdataset .tar or a folder of them; a path or "
            "a URL) with the pool's pHash and match them against OUTPUT's `phash` column (the phash stage): "
            "pairs at most --radius bits apart. Writes OUTPUT/decontamination/matches.parquet (uid, "
            "pool_image_path, pool_key, eval_set, eval_id, kind, distance: both sides' ids, as DataComp "
            "publishes) and decontamination.json. `curate select` then leaves the matched uids out unless "
            "--include-contaminated; `curate query` sees the view `decontamination`. A re-run replaces both."
        ),
        epilog=(
            "examples:\n"
            "  curate decontaminate runs/laion --against eval/imagenet-val/ eval/coco-val.tar\n"
            '  curate query runs/laion "SELECT eval_set, count(*) FROM decontamination GROUP BY 1"\n'
            "  curate select runs/laion --where keep --out subsets/clean    # matches left out"
        ),
        formatter_class=Formatter,
    )
    p.add_argument("output", help="a `curate run` output: a directory or a URL (s3://bucket/run)")
    p.add_argument("--against", nargs="+", required=True, metavar="EVAL", help="evaluation image sets")
    p.add_argument("--radius", type=int, default=6, help="max Hamming distance in bits, 0-16 (default 6)")
    p.add_argument(
        "--embedding-checkpoint",
        metavar="CKPT",
        help="also match by image embedding: the open_clip checkpoint (path or URL) whose embeddings the run "
        "stored (clip_score with keep_embedding: true); refused if the run's embeddings came from another",
    )
    p.add_argument(
        "--embedding-model", metavar="NAME", help="its open_clip model name (default: the checkpoint's)"
    )
    p.add_argument("--min-cosine", type=float, default=0.95, help="embedding match threshold (default 0.95)")
    p.set_defaults(func=cmd_decontaminate)


def cmd_decontaminate(args: argparse.Namespace) -> int:
    from curation.core.outputs import RunLocked
    from curation.core.params import param_problems
    from curation.decontaminate import DecontaminateError, DecontaminateParams, run_decontaminate

    params = DecontaminateParams(
        radius=args.radius,
        embedding_checkpoint=args.embedding_checkpoint,
        embedding_model=args.embedding_model,
        min_cosine=args.min_cosine,
    )
    if problems := param_problems(params):
        return fail("; ".join(f"--{name}: {problem}" for name, problem in problems))
    try:
        s = run_decontaminate(args.output, args.against, params, say=_say)
    except (DecontaminateError, RunLocked) as e:
        return fail(e)
    print(
        printable(
            f"{s['pool_samples_matched']:,} pool sample(s) match {s['eval_images_matched']:,} of "
            f"{sum(s['against'].values()):,} evaluation image(s) within {params.radius} bits"
            + (f" or cosine {params.min_cosine}" if params.embedding_checkpoint else "")
            + " "
            f"-> {args.output.rstrip('/')}/decontamination/matches.parquet"
        )
    )
    if s["eval_images_unreadable"]:
        _say(f"{s['eval_images_unreadable']:,} evaluation image(s) could not be decoded and were not matched")
    return EXIT_OK


def _say(msg: str) -> None:
    print(f"decontaminate: {printable(msg)}", file=sys.stderr, flush=True)
