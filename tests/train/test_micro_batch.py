"""GradCache micro-batches: the gradients of the unsplit batch (float64, every loss), RNG replay, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from curation.models.clip import build_model
from train.config import load_train_config
from train.loop import _forward_rng, forward_backward, list_checkpoints, train
from train.losses import (
    ConceptDistillationLoss,
    HardNegativeMarginLoss,
    TrainingObjective,
    build_loss,
)
from train.model import ConceptStudent

B, VOCAB = 8, 11


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    partners = torch.zeros(B, B, dtype=torch.bool)
    for i in range(B // 2):  # half anchors, half their partners, as the hard-pair stream builds batches
        partners[i, B // 2 + i] = partners[B // 2 + i, i] = True
    ids = torch.randint(0, VOCAB, (B, 3), generator=g)
    ids[1] = -1  # a sample without targets
    ids[2, 2] = -1  # padding
    return {
        "image": torch.randn(B, 3, 28, 28, generator=g, dtype=torch.float64),
        "text": torch.randint(1, 1000, (B, 12), generator=g),
        "partners": partners,
        "concept_ids": ids,
        "concept_probs": torch.rand(B, 3, generator=g, dtype=torch.float64),
    }


def _net(distill: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("curate-tiny").model
    with torch.no_grad():  # a temperature away from its init, so its gradient is not trivially shaped
        model.logit_scale.fill_(2.0)
    net = ConceptStudent(model, 128, VOCAB) if distill else model
    return net.double()


def _grads(net, objective, batch, micro_batch):
    net.zero_grad(set_to_none=True)
    terms = forward_backward(net, objective, batch, micro_batch)
    return terms, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["infonce", "hn_nce"])
@pytest.mark.parametrize("hard_pairs", [False, True], ids=["plain", "hnml"])
@pytest.mark.parametrize("distill", [False, True], ids=["clip", "distill"])
def test_micro_batches_give_the_gradients_of_the_unsplit_batch(loss, hard_pairs, distill) -> None:
    net = _net(distill)
    objective = TrainingObjective(
        build_loss(loss, alpha=0.8, beta=0.7),
        margin=HardNegativeMarginLoss(0.3) if hard_pairs else None,
        distill=ConceptDistillationLoss("bce") if distill else None,
        distill_weight=0.5,
    )
    batch = _batch()
    whole_terms, whole = _grads(net, objective, batch, None)
    assert set(whole_terms) == {"contrastive_loss"} | (
        {"hard_negative_margin_loss"} if hard_pairs else set()
    ) | ({"distill_loss"} if distill else set())
    assert len(whole) == sum(1 for p in net.parameters() if p.requires_grad)  # every parameter has a gradient
    if hard_pairs:
        assert whole_terms["hard_negative_margin_loss"] > 0
    for micro in (1, 2, 4):
        terms, split = _grads(net, objective, batch, micro)
        assert split.keys() == whole.keys()
        for k in whole_terms:
            assert torch.allclose(terms[k], whole_terms[k], rtol=1e-12, atol=0), (micro, k)
        for name, g in whole.items():
            assert torch.allclose(split[name], g, rtol=1e-9, atol=1e-12), (
                micro,
                name,
                (split[name] - g).abs().max(),
            )


class _DropoutTowers(torch.nn.Module):
    """open_clip's output dict from two linear towers with dropout: the forward draws from the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.text = torch.nn.Linear(6, 4).double(), torch.nn.Linear(5, 4).double()
        self.drop = torch.nn.Dropout(0.5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, image, text):
        norm = torch.nn.functional.normalize
        return {
            "image_features": norm(self.drop(self.image(image)), dim=-1),
            "text_features": norm(self.drop(self.text(text)), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def test_the_re_forward_replays_each_micro_batch_dropout_masks() -> None:
    """The reference: the micro-batches forwarded with autograd from the same RNG state, the loss on the
    concatenation. Without the replay the re-forward would draw new masks and the gradients would differ."""
    torch.manual_seed(0)
    net = _DropoutTowers()
    objective = TrainingObjective(build_loss("hn_nce"))
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(B, 6, generator=g, dtype=torch.float64)}
    batch["text"] = torch.randn(B, 5, generator=g, dtype=torch.float64)

    torch.manual_seed(123)
    outs = [net(i, t) for i, t in zip(batch["image"].split(2), batch["text"].split(2))]
    rng_after_reference = _forward_rng(torch.device("cpu"))[0]
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    sum(objective({**merged, "logit_scale": outs[-1]["logit_scale"]}, batch).values()).backward()
    reference = {n: p.grad.clone() for n, p in net.named_parameters()}

    net.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    forward_backward(net, objective, batch, micro_batch=2)
    assert torch.equal(torch.get_rng_state(), rng_after_reference)  # the step draws as much as one pass
    for name, grad in reference.items():
        assert torch.allclose(net.get_parameter(name).grad, grad, rtol=1e-10, atol=1e-14), name


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_micro_batched_run_follows_the_unsplit_one_and_resumes_exactly(
    fmnist_shards, tmp_path, make_config, caplog
):
    sections = {
        "train": {"steps": 4, "checkpoint_every": 2, "batch_size": 16},
        "loss": {"name": "hn_nce"},
        # warm-up as long as the run: the log warns
        "optim": {"lr": 2e-3, "warmup_steps": 4, "grad_clip_norm": 1.0},
    }
    caplog.set_level("INFO", logger="train")
    whole_dir, micro_dir, resumed_dir = tmp_path / "whole", tmp_path / "micro", tmp_path / "resumed"
    train(load_train_config(make_config(tmp_path / "w.yaml", fmnist_shards, whole_dir, **sections)))
    micro = {**sections, "train": {**sections["train"], "micro_batch": 4}}
    train(load_train_config(make_config(tmp_path / "m.yaml", fmnist_shards, micro_dir, **micro)))
    resumed_cfg = make_config(tmp_path / "r.yaml", fmnist_shards, resumed_dir, **micro)
    train(load_train_config(resumed_cfg))
    for p in list_checkpoints(resumed_dir)[1:]:  # a crash after step 2's checkpoint
        p.unlink()
    train(load_train_config(resumed_cfg), resume=True)

    log = caplog.text
    assert "precision fp32" in log and "grad_clip_norm 1.0" in log and "micro-batch 4" in log
    assert "optim.warmup_steps (4) >= the run's 4 steps" in log
    whole, split, resumed = _metrics(whole_dir), _metrics(micro_dir), _metrics(resumed_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b, c in zip(whole, split, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)  # float32: summation order differs
        assert c["loss"] == pytest.approx(b["loss"], abs=1e-6)
    w_split = torch.load(micro_dir / "checkpoints" / "step_00000004.pt", weights_only=True)["state_dict"]
    w_res = torch.load(resumed_dir / "checkpoints" / "step_00000004.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(w_split[k], w_res[k], atol=1e-6) for k in w_split)


def test_micro_batch_must_divide_the_batch() -> None:
    from train.config import ConfigError, parse_train_config

    text = "data: {shards: x.tar}\noutput_dir: o\ntrain: {steps: 1, batch_size: 16, micro_batch: %s}\n"
    assert parse_train_config(text % 4).train.micro_batch == 4
    assert parse_train_config(text % "null").train.micro_batch is None
    for bad in (5, 0):
        with pytest.raises(ConfigError, match="micro_batch"):
            parse_train_config(text % bad)


def _checkpointing_grads(name: str, checkpointing: bool, micro_batch: int | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name).model.double()
    model.set_grad_checkpointing(checkpointing)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(4, 3, size, size, generator=g, dtype=torch.float64),
        "text": torch.randint(1, 1000, (4, model.context_length), generator=g),
    }
    forward_backward(model, TrainingObjective(build_loss("hn_nce")), batch, micro_batch)
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["curate-tiny", pytest.param("ViT-B-32", marks=pytest.mark.slow)])
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    """open_clip's set_grad_checkpointing, with and without micro-batches (float64)."""
    plain = _checkpointing_grads(name, False, None)
    for micro in (None, 2):
        ckpt = _checkpointing_grads(name, True, micro)
        for n, g in plain.items():
            assert torch.allclose(ckpt[n], g, rtol=1e-9, atol=1e-12), (name, micro, n)


def test_micro_batches_with_batchnorm_that_trains_are_refused(fmnist_shards, make_config, tmp_path, capsys):
    """GradCache is exact only when samples pass independently: a BatchNorm tower that trains is refused
    by `curate validate` and `curate train` alike, before anything is written; a locked one is not."""
    from curation.cli import main

    run = tmp_path / "run"
    lite0 = {"model": {"name": "curate-lite0"}, "train": {"micro_batch": 4}}
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, run, **lite0)
    for command in ("validate", "train"):
        assert main([command, str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "train.micro_batch" in err and "BatchNorm layer(s) that train" in err, err
        assert "Traceback" not in err
    assert not run.exists()
    locked = {"model": {"name": "curate-lite0", "lock_image": True}, "train": {"micro_batch": 4}}
    assert main(["validate", str(make_config(tmp_path / "l.yaml", fmnist_shards, run, **locked))]) == 0
    # Micro-batches of the whole batch split nothing: accepted.
    whole = {"model": {"name": "curate-lite0"}, "train": {"micro_batch": 16}}
    assert main(["validate", str(make_config(tmp_path / "w.yaml", fmnist_shards, run, **whole))]) == 0
