"""Reading weight files: a state dict from any checkpoint layout, and a file's content hash."""

from __future__ import annotations

import hashlib
import os
from typing import Any


def torch_load(path: str | os.PathLike) -> Any:
    """torch.load of tensors only (weights_only), memory-mapped where the format allows."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:  # legacy (non-zip) serialisation cannot be memory-mapped
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
