"""HN-NCE and InfoNCE against open_clip, a float64 reference, and a 2-rank gloo run."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from train.losses import HNNCELoss, InfoNCELoss


def _features(k: int, d: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def reference_hn_nce(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, alpha: float, beta: float):
    """docs/methods.md §2a written out literally with loops and plain exp (use float64)."""
    s = scale * img @ txt.T
    k = s.shape[0]

    def direction(m: torch.Tensor) -> torch.Tensor:
        total = 0
        for i in range(k):
            neg = [j for j in range(k) if j != i]
            z = sum(torch.exp(beta * m[i, j]) for j in neg)
            denom = alpha * torch.exp(m[i, i]) + sum(
                (k - 1) * torch.exp(beta * m[i, j]) / z * torch.exp(m[i, j]) for j in neg
            )
            total = total - torch.log(torch.exp(m[i, i]) / denom)
        return total / k

    return (direction(s) + direction(s.T)) / 2


@pytest.mark.parametrize("k", [2, 7, 64])
def test_hn_nce_alpha1_beta0_equals_infonce_and_open_clip(k: int) -> None:
    from open_clip.loss import ClipLoss

    img, txt = _features(k, seed=k)
    scale = torch.tensor(1 / 0.07)
    ours = HNNCELoss(alpha=1.0, beta=0.0)(img, txt, scale)
    nce = InfoNCELoss()(img, txt, scale)
    clip = ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, nce, atol=1e-6, rtol=0)
    assert torch.allclose(nce, clip, atol=1e-6, rtol=0)
    assert torch.allclose(ours, clip, atol=1e-6, rtol=0)
    assert InfoNCELoss()(img, txt, scale, output_dict=True).keys() == {"contrastive_loss"}


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_importance_weights_sum_to_k_minus_1_per_anchor(beta: float) -> None:
    k = 9
    img, txt = _features(k, seed=3)
    # Non-square structure matters: make the logits asymmetric so a wrong axis would show.
    logits = 20.0 * img @ txt.T + torch.linspace(0, 3, k)[None, :]
    w_i2t, w_t2i = HNNCELoss(beta=beta).importance_weights(logits)
    for w in (w_i2t, w_t2i):
        assert torch.allclose(w.sum(dim=1), torch.full((k,), k - 1.0), atol=1e-5)
        assert torch.all(w.diagonal() == 0)
    # The t2i weights are normalised over images per text anchor, i.e. over columns of the logits.
    expected = torch.softmax(
        (beta * logits.T).masked_fill(torch.eye(k, dtype=torch.bool), -math.inf), dim=1
    ) * (k - 1)
    assert torch.allclose(w_t2i, expected, atol=1e-6)
    if beta > 0:  # harder negatives (higher similarity) get more weight
        row = logits[0, 1:]
        assert torch.argmax(w_i2t[0, 1:]) == torch.argmax(row)


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.5), (0.5, 1.0), (0.0, 0.5), (1.0, 0.0)])
def test_loss_and_gradients_match_float64_reference(alpha: float, beta: float) -> None:
    k = 12
    img64, txt64 = _features(k, seed=11, dtype=torch.float64)
    scale64 = torch.tensor(1 / 0.07, dtype=torch.float64)
    leaves64 = [t.clone().requires_grad_() for t in (img64, txt64, scale64)]
    ref = reference_hn_nce(*leaves64, alpha=alpha, beta=beta)
    ref.backward()

    leaves32 = [t.detach().float().clone().requires_grad_() for t in (img64, txt64, scale64)]
    ours = HNNCELoss(alpha=alpha, beta=beta)(*leaves32)
    ours.backward()
    assert abs(ours.item() - ref.item()) < 1e-5
    for a, b in zip(leaves32, leaves64):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-5, rtol=1e-4), (a.grad, b.grad)


def test_hn_nce_is_stable_at_large_logit_scale() -> None:
    img, txt = _features(32, seed=5)
    loss = HNNCELoss(alpha=1.0, beta=0.5)(img, txt, torch.tensor(100.0))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="at least 2"):
        HNNCELoss()(img[:1], txt[:1], torch.tensor(10.0))


# --------------------------------------------------------------------------- 2 ranks (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _towers(d_in: int = 10, d: int = 8) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(d_in, d), torch.nn.Linear(d_in, d)


def _step(img_tower, txt_tower, x, y, loss_fn) -> torch.Tensor:
    img = F.normalize(img_tower(x), dim=-1)
    txt = F.normalize(txt_tower(y), dim=-1)
    return loss_fn(img, txt, torch.tensor(1 / 0.07))


LOSSES = {"hn_nce": lambda: HNNCELoss(alpha=0.7, beta=0.5), "infonce": InfoNCELoss}


def _rank_main(rank: int, world: int, port: int, x, y, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        n = x.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        for name, make_loss in LOSSES.items():
            img_tower, txt_tower = _towers()
            img_ddp, txt_ddp = DDP(img_tower), DDP(txt_tower)
            loss = _step(img_ddp, txt_ddp, x[sl], y[sl], make_loss())
            loss.backward()
            out[(rank, name)] = {
                "loss": loss.detach().clone(),
                "grads": [
                    p.grad.detach().clone() for p in [*img_tower.parameters(), *txt_tower.parameters()]
                ],
            }
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_equal_one_rank_on_concatenated_batch() -> None:
    """Loss and DDP-averaged parameter gradients of 2 ranks x 8 samples == 1 process x 16 samples."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_main, args=(2, _free_port(), x, y, out), nprocs=2, start_method="spawn")
        results = dict(out)

    for name, make_loss in LOSSES.items():
        img_tower, txt_tower = _towers()
        loss = _step(img_tower, txt_tower, x, y, make_loss())
        loss.backward()
        single = [p.grad for p in [*img_tower.parameters(), *txt_tower.parameters()]]
        # Local loss (the default): each rank's loss covers its own anchors; their mean is the global loss.
        mean = (results[(0, name)]["loss"] + results[(1, name)]["loss"]) / 2
        assert torch.allclose(mean, loss.detach(), atol=1e-6), name
        for rank in (0, 1):
            got = results[(rank, name)]
            for a, b in zip(got["grads"], single):
                assert torch.allclose(a, b, atol=1e-6), (name, (a - b).abs().max())
