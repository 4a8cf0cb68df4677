"""Reading the files of a folder a user names (an image folder): inside it, regular files, bounded.

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
    try:
        # O_NOFOLLOW: a symlink swapped in since the check is refused; O_NONBLOCK: a FIFO does not wait.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise FileRefused(UNREADABLE, f"{path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(NOT_A_FILE, f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise FileRefused(TOO_LARGE, f"{path} holds {info.st_size:,} bytes > the limit of {max_bytes:,}")
        data = f.read(max_bytes + 1)  # a file that grew since the stat is still bounded
    if len(data) > max_bytes:
        raise FileRefused(TOO_LARGE, f"{path} holds more than the limit of {max_bytes:,} bytes")
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
