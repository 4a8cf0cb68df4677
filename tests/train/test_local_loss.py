"""Local loss (each rank computes its own rows of the logits) == the global computation, float64, 2 gloo ranks."""

from __future__ import annotations

import socket

import torch
import torch.nn.functional as F

from train.losses import HardNegativeMarginLoss, HNNCELoss, InfoNCELoss

WORLD, PER_RANK, DIM = 2, 6, 5
LOSSES = {
    "infonce": lambda local: InfoNCELoss(local_loss=local),
    "hn_nce": lambda local: HNNCELoss(alpha=0.6, beta=1.5, local_loss=local),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    g = torch.Generator().manual_seed(7)
    n = WORLD * PER_RANK
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    partners = torch.zeros(n, n, dtype=torch.bool)
    for r in range(WORLD):  # pairs inside each rank's batch, as the hard-pair sampler draws them
        base = r * PER_RANK
        for i in range(PER_RANK // 2):
            partners[base + i, base + PER_RANK // 2 + i] = partners[base + PER_RANK // 2 + i, base + i] = True
    return img, txt, partners


def _grads(make, img, txt, extra):
    """Loss and d loss / d (image, text, logit scale) for leaf copies of the inputs."""
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(12.5, dtype=torch.float64, requires_grad=True)
    loss = make(img, txt, scale, extra)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def _calls(local: bool):
    calls = {name: (lambda i, t, s, _p, f=f: f(local)(i, t, s)) for name, f in LOSSES.items()}
    calls["hnml"] = lambda i, t, _s, p: HardNegativeMarginLoss(0.3, local_loss=local)(i, t, p)
    return calls


def _rank_main(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        img, txt, partners = _inputs()
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for local in (True, False):
            for name, call in _calls(local).items():
                out[(rank, name, local)] = _grads(call, img[sl], txt[sl], partners[sl, sl])
    finally:
        dist.destroy_process_group()


def test_local_and_global_loss_on_two_gloo_ranks_equal_one_process() -> None:
    """Per-rank feature gradients equal under local and global loss, and W x those of one process
    (DDP divides by W); the ranks' mean loss is the one-process loss; logit-scale gradients
    summed over ranks (the local case) or equal on every rank (global) match."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank_main, args=(_free_port(), out), nprocs=WORLD, start_method="spawn")
        results = dict(out)

    img, txt, partners = _inputs()
    for name, call in _calls(True).items():
        loss, g_img, g_txt, g_scale = _grads(call, img, txt, partners)
        assert loss > 0 and g_img.abs().sum() > 0, name
        local_losses = [results[(r, name, True)][0] for r in range(WORLD)]
        assert torch.allclose(sum(local_losses) / WORLD, loss, rtol=1e-12, atol=0), name
        if name != "hnml":
            # local losses differ between ranks: each covers different anchors
            assert not torch.allclose(local_losses[0], local_losses[1]), name
        scale_sum = 0.0
        for r in range(WORLD):
            sl = slice(r * PER_RANK, (r + 1) * PER_RANK)
            _, li, lt, ls = results[(r, name, True)]
            gl, gi, gt, gs = results[(r, name, False)]
            assert torch.allclose(gl, loss, rtol=1e-12, atol=0), name
            for got_local, got_global, single in ((li, gi, g_img[sl]), (lt, gt, g_txt[sl])):
                assert torch.allclose(got_local, got_global, rtol=1e-10, atol=1e-14), name
                assert torch.allclose(got_local, WORLD * single, rtol=1e-10, atol=1e-14), name
            if ls is not None:
                assert torch.allclose(gs, g_scale, rtol=1e-10), name
                scale_sum = scale_sum + ls
        if g_scale is not None:
            # DDP sums (then averages) the logit-scale parameter's gradient over ranks
            assert torch.allclose(scale_sum / WORLD, g_scale, rtol=1e-10), name
