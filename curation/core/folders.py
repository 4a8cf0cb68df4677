"""Reading the files of a folder a user names (an image folder): inside it, regular files, bounded;
and single files a user names (`read_named_file`): regular files, bounded.

A folder received from someone else is untrusted like a URL list: a symlink in
it may point anywhere readable (`caption.txt -> ~/.ssh/id_rsa`), a FIFO named
`x.jpg` blocks its reader forever, `z.jpg -> /dev/zero` never ends. Every read
goes through `read_inside`, which refuses those with a `FileRefused` status.
"""

from __future__ import annotations

import os
import stat

OUTSIDE = "outside_folder"
NOT_A_FILE = "not_a_file"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"


class FileRefused(Exception):
    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def is_inside(real: str, root: str) -> bool:
    """Whether the real path `real` is `root` or lies under it (`root` real too)."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def read_inside(path: str | os.PathLike, root: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of `path`, a regular file whose real path lies under `root`, of at most `max_bytes`."""
    real = os.path.realpath(path)
    top = os.path.realpath(root)
    if not is_inside(real, top):
        raise FileRefused(OUTSIDE, f"{path} resolves to {real}, outside {top}")
    # O_NOFOLLOW: a symlink swapped in since the check is refused.
    return _read_regular(real, str(path), max_bytes, os.O_NOFOLLOW)


def read_named_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a file a user named (a metadata list, a template file): a regular file, not a
    FIFO that blocks forever or a device that never ends, of at most `max_bytes`."""
    return _read_regular(os.fspath(path), str(path), max_bytes, 0)


def _read_regular(real: str, shown: str, max_bytes: int, flags: int) -> bytes:
    try:
        # O_NONBLOCK: a FIFO does not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    except OSError as e:
        raise FileRefused(UNREADABLE, f"{shown}: {e.strerror or e}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        what = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise FileRefused(NOT_A_FILE, f"{shown} is {what}")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > max_bytes:
            raise FileRefused(TOO_LARGE, f"{shown} holds {info.st_size:,} bytes > the limit of {max_bytes:,}")
        data = f.read(max_bytes + 1)  # a file that grew since the stat is still bounded
    if len(data) > max_bytes:
        raise FileRefused(TOO_LARGE, f"{shown} holds more than the limit of {max_bytes:,} bytes")
    return data


def list_files(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Files under `folder` (recursively, hidden ones and symlinked folders left out) whose extension
    is one of `extensions`, sorted. Listed are names; `read_inside` decides whether each is read."""
    out = []
    for root, dirs, names in os.walk(folder):  # followlinks=False: a symlinked folder is not entered
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not name.startswith(".") and name.rpartition(".")[2].lower() in extensions:
                out.append(os.path.join(root, name))
    return sorted(out)
