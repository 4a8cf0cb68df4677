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


def micro_batch_problem(model: torch.nn.Module, micro_batch: int | None, batch_size: int) -> str | None:
    """Why `train.micro_batch` cannot split this model's steps exactly (None: it can).

    GradCache is exact when a forward pass treats samples independently. A BatchNorm layer that
    trains does not: each micro-batch is normalised by its own statistics, not the batch's, and the
    running statistics move on both passes. Refused rather than approximated. Looked at in training
    mode (`model.train()`), where a locked tower's layers stay in evaluation mode.
    """
    if micro_batch is None or micro_batch >= batch_size:
        return None
    was_training = model.training
    model.train()
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
    ]
    model.train(was_training)
    if not names:
        return None
    return (
        f"the model has {len(names)} BatchNorm layer(s) that train (e.g. {names[0]}): micro-batches would "
        "be normalised by their own statistics and update the running ones twice, so the step would not "
        "be the batch's; set train.micro_batch: null, or freeze the tower (model.lock_image: true)"
    )
