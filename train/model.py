"""open_clip's factory with local-only weights, so checkpoints stay loadable by open_clip itself."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def _register_packaged_configs() -> None:
    """Make "curate-tiny" (and any JSON under train/model_configs) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def resolve_model_name(name: str) -> str:
    """An open_clip name as is; a path to a JSON model config is registered and named by its stem."""
    import open_clip

    _register_packaged_configs()
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {name}")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {name!r}; a JSON config path also works. Known: {open_clip.list_models()}"
        )
    return name


@dataclass
class BuiltModel:
    model: torch.nn.Module
    name: str  # the name open_clip knows it by
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable


def build_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> BuiltModel:
    """Random init, or weights from a local checkpoint file (open_clip state dict or a curate checkpoint).

    The model is created in fp32; bf16/amp training uses autocast, so the master weights stay fp32.
    """
    import open_clip

    resolved = resolve_model_name(name)
    if pretrained is not None and not Path(pretrained).is_file():
        # open_clip would treat an unknown string as a pretrained *tag* and download it; we never do.
        raise FileNotFoundError(f"pretrained must be a local checkpoint file, got {pretrained!r}")
    with _QuietRandomInit():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            resolved, pretrained=pretrained, device=device, output_dict=True
        )
    return BuiltModel(model, resolved, preprocess_train, preprocess_val, open_clip.get_tokenizer(resolved))


class _QuietRandomInit(logging.Filter):
    """Random init is the normal case here, not a warning: drop that one root-logger line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self)


def embed_dim(built: BuiltModel) -> int:
    """Width of the joint embedding space (the image and text features)."""
    import open_clip

    cfg = open_clip.get_model_config(built.name)
    if cfg is None or "embed_dim" not in cfg:
        raise ValueError(f"open_clip has no config with embed_dim for model {built.name!r}")
    return int(cfg["embed_dim"])


class ConceptStudent(torch.nn.Module):
    """A CLIP model plus a linear head from its (normalised) image embedding onto a concept vocabulary.

    One module, so DDP averages the head's gradients with the model's. The CLIP
    model is the same object as before: its state dict is saved as it is (and
    loads in open_clip); the head is saved beside it. The head's bias starts at
    the prior logit of a concept, log(1/(V-1)), so the BCE distillation loss
    starts near its floor instead of at V·log 2.
    """

    def __init__(self, clip: torch.nn.Module, embed_dim: int, vocabulary_size: int) -> None:
        super().__init__()
        self.clip = clip
        self.head = torch.nn.Linear(embed_dim, vocabulary_size)
        with torch.no_grad():
            self.head.bias.fill_(-math.log(max(1, vocabulary_size - 1)))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.clip(image, text)
        out["concept_logits"] = self.head(out["image_features"])
        return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on 1-d params, norms, biases and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
