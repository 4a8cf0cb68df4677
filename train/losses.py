"""Contrastive losses in open_clip's calling convention, and the training objective that sums them.

`loss(image_features, text_features, logit_scale, output_dict=False)` with
L2-normalised features and `logit_scale = 1/τ` (already exponentiated, as
open_clip models return it).

Under data parallelism each rank passes its local features; they are gathered
*with gradients* (open_clip's `gather_with_grad=True`) so the negatives come
from the global batch. By default each rank then computes only **its own rows**
of the logits against the gathered features (open_clip's `local_loss`): memory
per rank is B x W·B instead of W·B x W·B. This is exact for every loss here,
because each anchor's term reads only its own row of the global similarity
matrix (docs/methods.md §2a, "local loss"):

- InfoNCE: row i's cross-entropy needs s_i· only.
- HN-NCE image-to-text: w_ij is normalised over anchor i's negatives j≠i, which
  all sit in row i.
- HN-NCE text-to-image: text anchor j's weights normalise over column j of S
  (images i≠j). Column j is <I_·, T_j>/τ for *all* images, i.e. the row of
  T_j @ all_images^T: each rank computes its own texts against all gathered
  images, never the transpose of its image rows (which holds only W·B entries
  of B columns, not B full columns).
- HNML: anchor i's margin reads sim(I_i, T_·) and its partner row; partners are
  drawn into the anchor's own rank's batch, so the global partner row is the
  local one placed at the rank's offset, zero elsewhere.

Each rank's loss is the mean over its anchors; the global loss is the mean of
the ranks' losses (equal batch per rank). The gather's backward sums every
rank's contribution into each rank's features (W x dL/df), which DDP's gradient
averaging divides by W: parameter gradients equal one process on the
concatenated batch, as with the global computation (test: 2 gloo ranks vs 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather_with_grad(
    image_features: torch.Tensor, text_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate features of all ranks in rank order; gradients flow back to their owners."""
    _, world_size = _world()
    if world_size == 1:
        return image_features, text_features
    import torch.distributed.nn  # differentiable collectives

    all_image = torch.cat(torch.distributed.nn.all_gather(image_features), dim=0)
    all_text = torch.cat(torch.distributed.nn.all_gather(text_features), dim=0)
    return all_image, all_text


def _scaled(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    # float32 at least (bf16/fp16 autocast), float64 kept as is (the exactness tests).
    dtype = torch.promote_types(rows.dtype, torch.float32)
    return logit_scale * rows.to(dtype) @ columns.to(dtype).T


def _out(loss: torch.Tensor, output_dict: bool) -> torch.Tensor | dict[str, torch.Tensor]:
    # Same key as open_clip's ClipLoss so its train loop (sum of dict values) accepts ours.
    return {"contrastive_loss": loss} if output_dict else loss


class _RowLoss(nn.Module):
    """A symmetric contrastive loss whose every anchor reads only its own row of the similarity matrix.

    Subclasses define `direction(logits, first)`: the mean loss of anchors whose rows
    are `logits` [n, k] and whose positives sit at columns first, first+1, ...
    """

    def __init__(self, local_loss: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss

    def direction(self, logits: torch.Tensor, first: int) -> torch.Tensor:
        raise NotImplementedError

    def rows_loss(
        self,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
        all_image: torch.Tensor,
        all_text: torch.Tensor,
        first: int,
        logit_scale: torch.Tensor | float,
    ) -> torch.Tensor:
        """The loss of the anchors `image_rows`/`text_rows` (global positions first...) against all features."""
        i2t = self.direction(_scaled(image_rows, all_text, logit_scale), first)
        t2i = self.direction(_scaled(text_rows, all_image, logit_scale), first)
        return (i2t + t2i) / 2

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        rank, world_size = _world()
        all_image, all_text = gather_with_grad(image_features, text_features)
        if self.local_loss and world_size > 1:
            first = rank * image_features.shape[0]
            loss = self.rows_loss(image_features, text_features, all_image, all_text, first, logit_scale)
        else:
            loss = self.rows_loss(all_image, all_text, all_image, all_text, 0, logit_scale)
        return _out(loss, output_dict)


class InfoNCELoss(_RowLoss):
    """CLIP's symmetric cross-entropy over the global batch."""

    def direction(self, logits: torch.Tensor, first: int) -> torch.Tensor:
        labels = torch.arange(first, first + logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, labels)


class HNNCELoss(_RowLoss):
    """DiHT's HN-NCE (docs/methods.md §2a): negatives re-weighted by importance w_ij ∝ exp(β s_ij).

    For anchor i (a row of `logits`), over its negatives j ≠ i:
        w_ij = (k-1) · softmax_{j≠i}(β s_ij)          (so Σ_{j≠i} w_ij = k-1 for every anchor)
        ℓ_i  = -s_ii + log(α e^{s_ii} + Σ_{j≠i} w_ij e^{s_ij})
    Text-to-image applies the same to the text rows (T @ I^T, the columns of S), so its
    weights are normalised over images for each text anchor. α=1, β=0 is InfoNCE exactly.
    The weights are part of the graph (not detached), as in the formula and in
    Robinson et al.'s hard-negative objective it builds on. Everything is computed
    in the log domain: no exp of raw logits, so no overflow at logit_scale=100.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, local_loss: bool = True) -> None:
        super().__init__(local_loss)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.beta = float(beta)

    @staticmethod
    def _positives(logits: torch.Tensor, first: int) -> torch.Tensor:
        """Bool mask of each row's positive (column first + row)."""
        n, k = logits.shape
        rows = torch.arange(n, device=logits.device)
        mask = torch.zeros(n, k, dtype=torch.bool, device=logits.device)
        mask[rows, rows + first] = True
        return mask

    @staticmethod
    def _log_weights(logits: torch.Tensor, beta: float, first: int = 0) -> torch.Tensor:
        """log w_ij for each row anchor; the positive is -inf."""
        k = logits.shape[1]
        if k < 2:
            raise ValueError("HN-NCE needs a global batch of at least 2 (it has no negatives otherwise)")
        scaled = (beta * logits).masked_fill(HNNCELoss._positives(logits, first), float("-inf"))
        # Normalised per anchor (keepdim=True): each row's weights sum to k-1.
        return math.log(k - 1) + scaled - torch.logsumexp(scaled, dim=1, keepdim=True)

    def importance_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_i2t, w_t2i) of a square global matrix: row i holds anchor i's weights, 0 on the diagonal."""
        return self._log_weights(logits, self.beta).exp(), self._log_weights(logits.T, self.beta).exp()

    def direction(self, logits: torch.Tensor, first: int) -> torch.Tensor:
        positive = self._positives(logits, first)
        pos = logits[positive]
        terms = self._log_weights(logits, self.beta, first) + logits
        log_alpha = math.log(self.alpha) if self.alpha > 0 else float("-inf")
        # Positive term α e^{s_ii} sits in the log-sum-exp at the positive's column.
        terms = torch.where(positive, (log_alpha + logits).to(terms.dtype), terms)
        return (torch.logsumexp(terms, dim=1) - pos).mean()


class HardNegativeMarginLoss(nn.Module):
    r"""HELIP's hard negative margin loss (docs/methods.md §3c), already multiplied by γ.

    For anchor i with hard-partner set H_i (the texts j with `partners[i, j]`), sim = cosine:

        ℓ(i) = 1/|B| Σ_{j ∈ B \ ({i} ∪ H_i)} max(0, sim(I_i, T_j) - min_{h ∈ H_i} sim(I_i, T_h))
        loss = γ · mean_i ℓ(i)          (rows without partners contribute 0 to the mean)

    |B| is the global batch. Under data parallelism features are gathered with gradients like
    the contrastive losses; `partners` ([B, B] over the rank's local batch) places each rank's
    block on the diagonal of the global matrix (a sample's hard partners are drawn into its own
    rank's batch). With `local_loss` each rank takes its own anchors' rows only (no gather of
    the partner matrix); otherwise every rank computes the whole matrix.
    Cosines are computed in float32 whatever the autocast dtype.
    """

    def __init__(self, gamma: float = 0.3, local_loss: bool = True) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.local_loss = local_loss

    def rows_loss(
        self, image_rows: torch.Tensor, all_text: torch.Tensor, hard: torch.Tensor, first: int
    ) -> torch.Tensor:
        """γ · mean over the anchors `image_rows` (global positions first...) of ℓ; `hard` is [n, k]."""
        k = hard.shape[1]
        positive = HNNCELoss._positives(hard, first)
        hard = hard & ~positive
        sim = _scaled(image_rows, all_text, 1.0)
        has = hard.any(dim=1)
        # The least similar hard partner of each anchor sets its bar; rows without partners get 0 (masked below).
        bar = sim.masked_fill(~hard, float("inf")).amin(dim=1)
        bar = torch.where(has, bar, torch.zeros_like(bar))
        excess = (sim - bar[:, None]).clamp(min=0).masked_fill(hard | positive | ~has[:, None], 0.0)
        return self.gamma * (excess.sum(dim=1) / k).mean()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        partners: torch.Tensor,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        b = image_features.shape[0]
        if partners.shape != (b, b) or partners.dtype != torch.bool:
            raise ValueError(
                f"partners must be a bool [{b}, {b}] matrix, got {partners.dtype} {tuple(partners.shape)}"
            )
        rank, world_size = _world()
        all_image, all_text = gather_with_grad(image_features, text_features)
        partners = partners.to(all_image.device)
        if self.local_loss and world_size > 1:
            hard = torch.zeros(b, b * world_size, dtype=torch.bool, device=partners.device)
            hard[:, rank * b : (rank + 1) * b] = partners
            loss = self.rows_loss(image_features, all_text, hard, rank * b)
        else:
            loss = self.rows_loss(all_image, all_text, _block_diagonal(partners), 0)
        return {"hard_negative_margin_loss": loss} if output_dict else loss


def _block_diagonal(local: torch.Tensor) -> torch.Tensor:
    """Every rank's [B, B] matrix on the diagonal of the global [W·B, W·B] one (False elsewhere)."""
    _, world_size = _world()
    if world_size == 1:
        return local
    as_bytes = local.to(torch.uint8).contiguous()  # gloo has no bool collectives
    parts = [torch.empty_like(as_bytes) for _ in range(world_size)]
    torch.distributed.all_gather(parts, as_bytes)
    return torch.block_diag(*parts).bool()


class ConceptDistillationLoss(nn.Module):
    """DiHT's concept distillation (docs/methods.md §2b): the student's concept logits against a teacher's stored top-k.

    `forward(concept_logits [B, V], target_ids [B, k], target_probs [B, k])`; the
    targets are the teacher's top-k concepts per sample, padded with id -1 and
    probability 0. Rows without any target (all -1) carry no teacher signal and
    are left out of the mean (a batch without targets gives 0, with gradients).

    - `bce`: every concept is a binary question. The k stored probabilities are
      soft targets for their concepts and every other concept's target is 0:
          ℓ_b = Σ_v [softplus(z_bv) − t_bv z_bv]      (= Σ_v BCE(σ(z_bv), t_bv))
      summed over the vocabulary and averaged over samples, so its scale is
      per sample, like the contrastive loss, whatever the vocabulary's size.
    - `kl`: the stored top-k renormalised into a distribution p over those k
      concepts; ℓ_b = KL(p_b || softmax(z_b)) = Σ_k p_bk (log p_bk − log softmax(z_b)_{id_bk}).
      Suited to softmax teachers (a single-label classifier, CLIP zero-shot).

    Only the k stored entries are gathered; no dense [B, V] target is built.
    Computed in float32 (stable under bf16/fp16 autocast). Each rank averages
    over its own samples: the targets are per sample, there is nothing to gather.
    """

    def __init__(self, kind: str = "bce") -> None:
        super().__init__()
        if kind not in ("bce", "kl"):
            raise ValueError(f"unknown distillation loss {kind!r}; expected 'bce' or 'kl'")
        self.kind = kind

    def forward(
        self, concept_logits: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor
    ) -> torch.Tensor:
        z = concept_logits.float()
        valid = target_ids >= 0
        ids = target_ids.clamp(min=0).long()
        probs = torch.where(valid, target_probs.float(), torch.zeros((), device=z.device))
        has_target = valid.any(dim=1)
        picked = z.gather(1, ids)  # z_{b, id_bk}; padded slots weigh 0 below
        if self.kind == "bce":
            per_sample = F.softplus(z).sum(dim=1) - (probs * picked).sum(dim=1)
        else:
            p = probs / probs.sum(dim=1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
            log_q = picked - torch.logsumexp(z, dim=1, keepdim=True)
            per_sample = (torch.xlogy(p, p) - p * log_q).sum(dim=1)
        per_sample = torch.where(has_target, per_sample, torch.zeros((), device=z.device))
        return per_sample.sum() / has_target.sum().clamp_min(1)


def build_loss(name: str, alpha: float = 1.0, beta: float = 0.5, local_loss: bool = True) -> _RowLoss:
    """The loss a config names: `infonce` or `hn_nce`."""
    if name == "infonce":
        return InfoNCELoss(local_loss)
    if name == "hn_nce":
        return HNNCELoss(alpha=alpha, beta=beta, local_loss=local_loss)
    raise ValueError(f"unknown loss {name!r}; expected 'infonce' or 'hn_nce'")


class TrainingObjective(nn.Module):
    """Everything the trainer minimises, as open_clip's `output_dict`: named terms, each already weighted.

    `forward(out, batch)` reads the model's output dict (`image_features`,
    `text_features`, `logit_scale`, and `concept_logits` when distilling) and the
    batch's `partners` / `concept_ids` / `concept_probs`; the total loss is the sum
    of the returned values. The terms depend on the model only through `out`, so
    the trainer can evaluate them on cached embeddings (micro-batches, train/loop.py).
    """

    def __init__(
        self,
        contrastive: _RowLoss,
        margin: HardNegativeMarginLoss | None = None,
        distill: ConceptDistillationLoss | None = None,
        distill_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.contrastive, self.margin, self.distill = contrastive, margin, distill
        self.distill_weight = float(distill_weight)

    def forward(
        self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        image, text = out["image_features"], out["text_features"]
        terms = {"contrastive_loss": self.contrastive(image, text, out["logit_scale"])}
        if self.margin is not None:
            terms["hard_negative_margin_loss"] = self.margin(image, text, batch["partners"])
        if self.distill is not None:
            distill = self.distill(out["concept_logits"], batch["concept_ids"], batch["concept_probs"])
            terms["distill_loss"] = self.distill_weight * distill
        return terms
