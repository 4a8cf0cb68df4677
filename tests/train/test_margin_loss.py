"""HELIP's hard negative margin loss: a literal float64 reference, edge cases, 2 gloo ranks == 1 rank."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from train.losses import HardNegativeMarginLoss


def _features(k: int, d: int = 8, seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(torch.randn(k, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def _partners(k: int, seed: int = 0, p: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(k, k, generator=g) < p
    m[0] = False  # a row without partners
    m[1, 1] = True  # a sample listed as its own partner is not one
    return m


def reference_margin(img: torch.Tensor, txt: torch.Tensor, partners: torch.Tensor, gamma: float):
    """docs/methods.md §3c written out with loops (float64)."""
    k = img.shape[0]
    total = img.new_zeros(())
    for i in range(k):
        hard = [h for h in range(k) if partners[i, h] and h != i]
        if not hard:
            continue
        bar = min(img[i] @ txt[h] for h in hard)
        ell = img.new_zeros(())
        for j in range(k):
            if j == i or j in hard:
                continue
            ell = ell + torch.clamp(img[i] @ txt[j] - bar, min=0)
        total = total + ell / k
    return gamma * total / k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_match_float64_reference(seed: int) -> None:
    img, txt = _features(12, seed=seed)
    partners = _partners(12, seed=seed)
    a_img, a_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    got = HardNegativeMarginLoss(gamma=0.3)(a_img, a_txt, partners)
    got.backward()
    b_img, b_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    want = reference_margin(b_img, b_txt, partners, 0.3)
    want.backward()
    assert got.item() > 0
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert torch.allclose(a_img.grad, b_img.grad, atol=1e-6)
    assert torch.allclose(a_txt.grad, b_txt.grad, atol=1e-6)


def test_rows_without_partners_contribute_zero_and_gamma_scales() -> None:
    img, txt = _features(6)
    none = torch.zeros(6, 6, dtype=torch.bool)
    assert HardNegativeMarginLoss()(img, txt, none).item() == 0.0
    partners = _partners(6, p=0.5)
    one = HardNegativeMarginLoss(gamma=1.0)(img, txt, partners)
    assert torch.allclose(HardNegativeMarginLoss(gamma=0.3)(img, txt, partners), 0.3 * one)
    # Zero when every negative is already below the least similar hard partner.
    aligned = F.normalize(torch.ones(4, 3, dtype=torch.float64), dim=-1)
    p = torch.zeros(4, 4, dtype=torch.bool)
    p[0, 1] = True
    # Identical columns of one matmul may still round apart (edge kernels): zero up to rounding.
    assert HardNegativeMarginLoss()(aligned, aligned, p).item() == pytest.approx(0.0, abs=1e-12)


def test_rejects_a_partner_matrix_of_the_wrong_shape_or_type() -> None:
    img, txt = _features(4)
    with pytest.raises(ValueError, match="bool"):
        HardNegativeMarginLoss()(img, txt, torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        HardNegativeMarginLoss()(img, txt, torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gamma"):
        HardNegativeMarginLoss(gamma=-1)


# --------------------------------------------------------------------------- 2 ranks (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _towers() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(10, 8), torch.nn.Linear(10, 8)


def _step(img_tower, txt_tower, x, y, partners) -> torch.Tensor:
    img = F.normalize(img_tower(x), dim=-1)
    txt = F.normalize(txt_tower(y), dim=-1)
    return HardNegativeMarginLoss(gamma=0.3)(img, txt, partners)


def _rank_main(rank: int, world: int, port: int, x, y, partners, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        n = x.shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        img_tower, txt_tower = _towers()
        img_ddp, txt_ddp = DDP(img_tower), DDP(txt_tower)  # held: DDP's gradient hooks die with the wrapper
        loss = _step(img_ddp, txt_ddp, x[sl], y[sl], partners[sl, sl])
        loss.backward()
        out[rank] = {
            "loss": loss.detach().clone(),
            "grads": [p.grad.detach().clone() for p in [*img_tower.parameters(), *txt_tower.parameters()]],
        }
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_equal_one_rank_on_concatenated_batch() -> None:
    """2 ranks x 8 samples (partners within each rank's batch) == 1 process x 16 with the block-diagonal matrix."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    partners = torch.zeros(16, 16, dtype=torch.bool)
    for r in (0, 1):  # anchors 0..3 paired with 4..7 inside each rank's half, as the hard-pair sampler does
        for i in range(4):
            partners[8 * r + i, 8 * r + 4 + i] = partners[8 * r + 4 + i, 8 * r + i] = True
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _rank_main, args=(2, _free_port(), x, y, partners, out), nprocs=2, start_method="spawn"
        )
        results = dict(out)

    img_tower, txt_tower = _towers()
    loss = _step(img_tower, txt_tower, x, y, partners)
    loss.backward()
    assert loss.item() > 0
    single = [p.grad for p in [*img_tower.parameters(), *txt_tower.parameters()]]
    # Local loss (the default): each rank's loss covers its own anchors; their mean is the global loss.
    assert torch.allclose((results[0]["loss"] + results[1]["loss"]) / 2, loss.detach(), atol=1e-6)
    for rank in (0, 1):
        for a, b in zip(results[rank]["grads"], single):
            assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
