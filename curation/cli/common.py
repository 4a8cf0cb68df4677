"""What every `curate` command shares: exit codes, the one error line, the overwrite rule.

Library functions return results and raise typed errors; only this package turns them
into printed lines and exit codes, so every command fails the same way:

    curate: error: <one line, control characters escaped>        (exit 2)
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import textwrap
from pathlib import Path

from curation.core.terminal import printable

EXIT_OK = 0  # done
EXIT_FAILED = 1  # finished, but some shards / rows / images failed (listed on stderr)
EXIT_USAGE = 2  # bad usage, config or input: nothing (more) was done
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # the reader went away (`curate ... | head`), as a process killed by SIGPIPE reports

# Errors that mean "this output cannot be written here" (a read-only mount, a full disk, no
# permission, a quota): the user's to fix, so one line, not a traceback.
OUTPUT_ERRNOS = frozenset(
    {errno.EROFS, errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.ENAMETOOLONG}
)

# torch.load's error for a file with a pickle payload advises retrying with weights_only=False, which
# would run that payload: never show it. Its first words mark where the advice starts.
_TORCH_UNSAFE = "Weights only load failed"
_UNSAFE_ADVICE = re.compile(
    r"weights_only\W+(set to\W+)?False|add_safe_globals|safe_globals\(", re.IGNORECASE
)
PICKLE_REFUSED = "it holds Python objects besides tensors (a pickle payload), which curate never runs"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help as every command shows it: descriptions as written, and every default that has a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # Paragraphs wrap to the terminal; indented lines (examples) stay as written.
        lines = []
        for line in text.splitlines():
            if len(line) > max(width, 110) and not line.startswith(" "):  # hand-wrapped text stays
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
            else:
                lines.append(indent + line)
        return "\n".join(lines) + "\n"


class Parser(argparse.ArgumentParser):
    """argparse's usage errors in the same one-line form as every other error (exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise SystemExit(fail(f"{message} (see `{self.prog} --help`)"))


class UsageError(Exception):
    """A command line the CLI refuses before doing anything (exit 2)."""


def clean(message: str) -> str:
    """`message` as one printable line, without torch's advice to load a file unsafely."""
    message = str(message)
    at = message.find(_TORCH_UNSAFE)
    if at >= 0:
        message = message[:at] + PICKLE_REFUSED
    lines = [ln.strip() for ln in message.splitlines() if ln.strip() and not _UNSAFE_ADVICE.search(ln)]
    return printable(" ".join(lines))


def fail(message: object, code: int = EXIT_USAGE) -> int:
    """Print `curate: error: MESSAGE` (one line, escaped) and return the exit code."""
    print(f"curate: error: {clean(str(message))}", file=sys.stderr, flush=True)
    return code


def note(message: str) -> None:
    """A line for the user on stderr (progress, warnings), escaped."""
    print(f"curate: {printable(message)}", file=sys.stderr, flush=True)


def output_error(e: OSError) -> str | None:
    """One line for an OSError that means an output cannot be written (None for other errors)."""
    if e.errno not in OUTPUT_ERRNOS:
        return None
    reason = e.strerror or os.strerror(e.errno or 0)
    return f"{e.filename}: {reason}" if e.filename else f"cannot write the output: {reason}"


def check_new_output(out: Path, force: bool, *, option: str = "--out", directory: bool = False) -> None:
    """The one overwrite rule of every command that writes a named output: a new path, or --force.

    An empty directory counts as new for commands that write a directory. Raises UsageError.
    """
    real = Path(os.path.realpath(out))
    if directory:
        if real.exists() and not real.is_dir():
            raise UsageError(f"{option} {out} exists and is not a directory")
        if real.is_dir() and any(real.iterdir()) and not force:
            raise UsageError(f"{option} {out} exists and is not empty; choose a new path or pass --force")
        return
    if real.is_dir():
        raise UsageError(f"{option} {out} is a directory; give the file to write")
    if real.exists() and not force:
        raise UsageError(f"{option} {out} exists; choose a new file or pass --force to replace it")


def fail_config(e: Exception) -> int:
    """A config error: `curate: error: FILE: N problem(s):` and one escaped line per problem (exit 2)."""
    head, *problems = str(e).splitlines() or [""]
    print(f"curate: error: {clean(head)}", file=sys.stderr)
    for line in problems:
        print(printable(line), file=sys.stderr)
    return EXIT_USAGE
