"""Reading weight files: a state dict from any checkpoint layout, and a file's content hash."""

from __future__ import annotations

import hashlib
import os
from typing import Any


class CheckpointError(ValueError):
    """A file that is not a weights-only torch checkpoint; the message names it (one line)."""

    def __init__(self, path: str | os.PathLike, why: str) -> None:
        super().__init__(f"cannot read checkpoint {path}: {why}")
        self.why = why


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load of tensors only (weights_only), memory-mapped where the format allows.
    Raises CheckpointError naming the file for what is not a torch checkpoint (OSError as it is)."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as e:
        text = str(e).strip()
        if text.startswith("Weights only load failed"):  # a pickle stream that is not tensors alone
            raise CheckpointError(
                path,
                "it holds a pickle payload besides tensors (refused: checkpoints are loaded weights-only)",
            ) from None
        # torch's own first line advises loading the file unsafely: never shown.
        first = "" if not text or text.startswith("Weights only") else text.splitlines()[0][:200]
        raise CheckpointError(
            path, f"not a torch checkpoint ({type(e).__name__}{': ' + first if first else ''})"
        ) from None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
