"""`curate`: score image-caption pairs once, select many times.

This package alone parses arguments, prints, and chooses exit codes (see
`common.py`); the library modules it calls return results and raise typed errors.

    pipeline.py   run, validate, status, stats, query
    select.py     select
    report.py     report
    dedup.py      dedup
    decontaminate.py   decontaminate
    compact.py    compact
    train.py      train, eval, mine (registered when the `train` package is installed)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from curation.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Parser,
    UsageError,
    fail,
    output_error,
)
from curation.core.terminal import stdout_is_broken

DESCRIPTION = """\
Offline data curation for CLIP-style pre-training.

  curate run pipelines/demo.yaml           score every pair, write Parquet manifests (resumable)
  curate status runs/demo                  shards done / total, failures
  curate stats runs/demo                   pass rate per filter, drop reasons, score histograms
  curate query runs/demo "SELECT count(*) FROM samples WHERE caption_complexity >= 3"
  curate select runs/demo --where "keep" --out subset.parquet --uids-only
  curate report runs/demo --out report.html   one HTML file: funnel, histograms, sample grids
  curate dedup runs/demo                   duplicate groups (exact, perceptual hash, embeddings)
  curate decontaminate runs/demo --against eval/   near-copies of evaluation images (select leaves them out)
  curate compact runs/demo                 few large manifest files instead of many small ones
  curate train train/configs/fashion_mnist.yaml      contrastive training on a selected subset
  curate eval train/configs/fashion_mnist.yaml --few-shot 0,1,2,4,8,16   zero-shot, retrieval, few-shot
  curate mine train/configs/mine_fashion_mnist.yaml  HELIP hard pairs for training

Every command that writes a named output refuses an existing one unless --force.
Exit codes: 0 done, 1 finished but some shards/rows failed (listed), 2 bad usage, config or output,
130 interrupted (Ctrl-C). An unexpected error is one line; CURATE_DEBUG=1 shows its traceback.
"""

# What Ctrl-C leaves behind and what to do next, per command (the rest write nothing partial).
RESUME_HINT = {
    "run": "finished shards are kept; run the same command again to resume",
    "train": "checkpoints are kept; resume with `curate train CONFIG --resume`",
    "dedup": "its work cache is kept; run the same command again to resume",
    "mine": "run the same command again to resume",
}
DEBUG_VARIABLE = "CURATE_DEBUG"


def _quiet_environment() -> None:
    """Settings curate needs, made here so users need not export them."""
    # albumentations (pulled in by text spotting) checks PyPI for a newer version on import and
    # advises an upgrade that would break the lock file.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def build_parser() -> argparse.ArgumentParser:
    from curation import __version__
    from curation.cli import compact, decontaminate, dedup, pipeline, report, select

    p = Parser(prog="curate", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"curate {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    pipeline.register(sub)
    select.register(sub)
    report.register(sub)
    dedup.register(sub)
    decontaminate.register(sub)
    compact.register(sub)
    if importlib.util.find_spec("train"):  # absent only in a partial install
        from curation.cli import train

        train.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _dispatch(argv)
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        command = next((a for a in argv if not a.startswith("-")), "")
        hint = RESUME_HINT.get(command, "outputs are written only when complete; run the command again")
        print(f"\ncurate: interrupted: {hint}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        if not stdout_is_broken():
            raise  # another pipe (a worker's, a socket's): a real failure
        # The reader went away (`| head`): stop quietly, and keep the interpreter's final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as e:  # a bug or an environment curate did not foresee: one line, not a traceback
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        return fail(
            f"unexpected {type(e).__name__}: {e} (set {DEBUG_VARIABLE}=1 for the traceback)", EXIT_FAILED
        )


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, --version and usage errors exit here (SystemExit)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    config = getattr(args, "config", None)
    if isinstance(config, str) and not os.path.exists(config):
        return fail(f"config file not found: {config}")
    from curation.core.storage import StorageError
    from curation.rundir import RunDirError

    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        return fail(e)
    except RunDirError as e:  # a damaged run.json, a ledger without one: one line naming the object
        return fail(e)
    except StorageError as e:  # an unusable store (credentials, bucket, endpoint down): one line
        return fail(e)
    except OSError as e:
        message = output_error(e)
        if message is None:
            raise
        return fail(message)


def main_train(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m train ...`, torchrun): `train CONFIG` is the default command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in {"train", "eval", "mine", "-h", "--help"}:
        argv = ["train", *argv]
    return main(argv)
