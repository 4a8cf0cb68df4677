"""The training side of a CLIP model: the distillation student and open_clip's weight-decay rule.

Building and loading models is curation.models.clip's, shared with the stages.
"""

from __future__ import annotations

import math

import torch


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
