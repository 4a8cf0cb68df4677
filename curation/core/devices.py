"""Where a stage's model runs: the one device rule every GPU-capable stage follows, and native bf16.

torch is imported inside the functions, so importing this module stays free
(`curate validate` never loads torch for stages that do not need it).
"""

from __future__ import annotations

import contextlib


def resolve_device(device: str) -> str:
    """`auto` is CUDA when this process sees a GPU, else the CPU; `cuda`/`cpu` as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute bf16 natively (AVX512-BF16 or AMX), where oneDNN runs it faster than fp32.

    Elsewhere bf16 is emulated and slower than fp32.
    """
    import torch

    native = False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        with contextlib.suppress(AttributeError, RuntimeError):  # private probes: absent in some builds
            native = native or bool(getattr(torch.cpu, probe)())
    return native
