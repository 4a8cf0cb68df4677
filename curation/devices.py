"""Which torch device a stage runs on: the one rule every GPU-capable stage follows."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """`auto` is CUDA when this process sees a GPU, else the CPU; `cuda`/`cpu` as given."""
    if device != "auto":
        return device
    import torch  # only GPU-capable stages call this, and they need torch anyway

    return "cuda" if torch.cuda.is_available() else "cpu"
