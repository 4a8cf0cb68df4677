"""Concept distillation in the trainer: the loss against a dense float64 reference, targets in batches,
the head beside the open_clip state dict, exact resume, config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.train.conftest import CONCEPT_VOCABULARY
from train.config import ConfigError, load_train_config, parse_train_config
from train.data import ShardStream, concept_targets, expand_shards
from train.loop import list_checkpoints, train
from train.losses import ConceptDistillationLoss
from train.validation import parse_checked_train_config


def _cli(argv: list[str]) -> int:
    """What `curate` does."""
    from curation.cli import main

    return main(argv)


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (output_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the loss


def dense_reference(z: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, kind: str) -> torch.Tensor:
    """The definition, written densely in float64 with explicit loops."""
    z = z.double()
    total, rows = torch.zeros((), dtype=torch.float64), 0
    for b in range(z.shape[0]):
        t = torch.zeros(z.shape[1], dtype=torch.float64)
        for i, p in zip(ids[b].tolist(), probs[b].tolist()):
            if i >= 0:
                t[i] = p
        if not (ids[b] >= 0).any():
            continue
        rows += 1
        if kind == "bce":
            s = torch.sigmoid(z[b])
            total = total - (t * torch.log(s) + (1 - t) * torch.log(1 - s)).sum()
        else:
            p = t / t.sum()
            log_q = torch.log_softmax(z[b], dim=0)
            total = total + sum(p[v] * (torch.log(p[v]) - log_q[v]) for v in range(z.shape[1]) if p[v] > 0)
    return total / max(rows, 1)


def random_targets(batch: int, vocab: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(batch)])
    probs = torch.rand(batch, k, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values / k
    # ragged rows: sample b keeps b % (k+1) targets; row 0 has none (no teacher signal)
    for b in range(batch):
        keep = b % (k + 1)
        ids[b, keep:] = -1
        probs[b, keep:] = 0.0
    return ids, probs


@pytest.mark.parametrize("kind", ["bce", "kl"])
def test_loss_and_gradients_match_dense_float64_reference(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    z = (3 * torch.randn(9, 50, generator=g, dtype=torch.float64)).requires_grad_()
    ids, probs = random_targets(9, 50, 5, seed=2)
    ours = ConceptDistillationLoss(kind)(z, ids, probs)
    ref = dense_reference(z, ids, probs, kind)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)  # ours computes in float32
    (g_ours,) = torch.autograd.grad(ours, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g_ours.double(), g_ref, atol=1e-6, rtol=1e-4)


def test_loss_definitions_in_numbers() -> None:
    z = torch.zeros(1, 4)
    ids, probs = torch.tensor([[2, -1]]), torch.tensor([[0.5, 0.0]])
    # BCE at logits 0: every concept costs log 2, the target's 0.5 changes nothing at z = 0
    assert ConceptDistillationLoss("bce")(z, ids, probs).item() == pytest.approx(4 * math.log(2))
    # KL of a one-hot (renormalised 0.5 -> 1) against a uniform prediction over 4: log 4
    assert ConceptDistillationLoss("kl")(z, ids, probs).item() == pytest.approx(math.log(4))
    # KL renormalises: scaling the stored probabilities changes nothing
    ids2, probs2 = torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.1]])
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    kl = ConceptDistillationLoss("kl")
    assert kl(logits, ids2, probs2).item() == pytest.approx(kl(logits, ids2, probs2 * 2.5).item(), rel=1e-6)


def test_batch_without_targets_is_zero_with_gradients() -> None:
    z = torch.randn(3, 7, requires_grad=True)
    for kind in ("bce", "kl"):
        loss = ConceptDistillationLoss(kind)(z, torch.full((3, 2), -1), torch.zeros(3, 2))
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
        z.grad = None
    with pytest.raises(ValueError, match="bce"):
        ConceptDistillationLoss("mse")


def test_loss_is_stable_in_bf16_autocast() -> None:
    z = (50 * torch.randn(4, 1000)).bfloat16()
    ids, probs = random_targets(4, 1000, 20, seed=3)
    for kind in ("bce", "kl"):
        value = ConceptDistillationLoss(kind)(z, ids, probs.float())
        assert torch.isfinite(value) and value.dtype == torch.float32


# --------------------------------------------------------------------------- batches


def test_stream_batches_carry_padded_targets(fmnist_concept_shards: Path) -> None:
    from curation.models.clip import build_model

    built = build_model("curate-tiny")
    stream = ShardStream(
        expand_shards(str(fmnist_concept_shards / "*.tar")),
        8,
        built.preprocess_val,
        built.tokenizer,
        shuffle_buffer=1,
        concept_vocabulary_size=len(CONCEPT_VOCABULARY),
    )
    batch = next(iter(stream))
    assert batch["concept_ids"].shape == (8, 3) and batch["concept_ids"].dtype == torch.int64
    assert batch["concept_probs"].shape == (8, 3) and batch["concept_probs"].dtype == torch.float32
    # k varies between samples: shorter rows are padded with id -1 and probability 0
    short = batch["concept_ids"][:, 2] == -1
    assert short.any() and not short.all()
    assert torch.all(batch["concept_probs"][short, 2] == 0)
    assert set(batch) == {"image", "text", "uid", "source", "concept_ids", "concept_probs"}


def test_target_errors_name_the_sample() -> None:
    sample = {"__key__": "k1", "__url__": "s.tar", "concepts.json": b'{"ids": [1, 40], "probs": [0.5, 0.2]}'}
    with pytest.raises(ValueError, match="outside the vocabulary of 30"):
        concept_targets([sample], 30)
    with pytest.raises(ValueError, match=r"'k1' in s\.tar has no concepts\.json"):
        concept_targets([{"__key__": "k1", "__url__": "s.tar"}], 30)
    with pytest.raises(ValueError, match="2 ids but 1 probs"):
        concept_targets([{**sample, "concepts.json": b'{"ids": [1, 2], "probs": [0.5]}'}], 30)
    ids, probs = concept_targets([{**sample, "concepts.json": b'{"ids": [], "probs": []}'}], 30)
    assert ids.tolist() == [[-1]] and probs.tolist() == [[0.0]]  # an image without targets


# --------------------------------------------------------------------------- training


def test_distilled_checkpoint_loads_in_open_clip_and_head_learns(
    fmnist_concept_shards, tmp_path, make_config
):
    out = tmp_path / "run"
    cfg = make_config(
        tmp_path / "c.yaml",
        fmnist_concept_shards,
        out,
        train={"steps": 8},
        optim={"lr": 5e-3, "warmup_steps": 2},
        distill={"weight": 1.0, "loss": "bce"},
    )
    result = train(load_train_config(cfg))
    recs = _metrics(out)
    assert {"distill_loss", "contrastive_loss"} <= set(recs[0])
    for r in recs:
        assert r["loss"] == pytest.approx(r["contrastive_loss"] + r["distill_loss"], rel=1e-5)
    # the head fits the (class-dependent) targets: the last steps' distillation loss is below the first ones'
    assert sum(r["distill_loss"] for r in recs[-3:]) < sum(r["distill_loss"] for r in recs[:3])

    state = torch.load(result.checkpoint, weights_only=True)
    assert state["concept_head"]["weight"].shape == (len(CONCEPT_VOCABULARY), 128)
    assert state["concept_vocabulary"] == CONCEPT_VOCABULARY
    assert not any(k.startswith(("head.", "clip.")) for k in state["state_dict"])

    import open_clip

    from curation.models.clip import MODEL_CONFIG_DIR

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    open_clip.create_model_and_transforms("curate-tiny", pretrained=str(result.checkpoint))  # strict load


def test_resume_restores_the_head_and_repeats_the_curve(fmnist_concept_shards, tmp_path, make_config) -> None:
    sections = {
        "train": {"steps": 6, "checkpoint_every": 3},
        "loss": {"name": "hn_nce"},
        "distill": {"weight": 0.5, "loss": "kl"},
    }
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train(load_train_config(make_config(tmp_path / "full.yaml", fmnist_concept_shards, full_dir, **sections)))
    split_cfg = make_config(tmp_path / "split.yaml", fmnist_concept_shards, split_dir, **sections)
    train(load_train_config(split_cfg))
    for p in list_checkpoints(split_dir)[1:]:
        p.unlink()  # a crash after step 3's checkpoint
    assert _cli(["train", str(split_cfg), "--resume"]) == 0
    for a, b in zip(_metrics(full_dir), _metrics(split_dir)):
        assert a["distill_loss"] == pytest.approx(b["distill_loss"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    heads = [
        torch.load(d / "checkpoints" / "step_00000006.pt", weights_only=True) for d in (full_dir, split_dir)
    ]
    for k in heads[0]["concept_head"]:
        torch.testing.assert_close(
            heads[0]["concept_head"][k], heads[1]["concept_head"][k], atol=1e-6, rtol=0
        )

    # a distilled checkpoint cannot be resumed without the distill section (and vice versa): usage error
    plain = make_config(tmp_path / "plain.yaml", fmnist_concept_shards, split_dir, train={"steps": 8})
    assert _cli(["train", str(plain), "--resume"]) == 2


def test_distill_config(tmp_path: Path, fmnist_shards, make_config, capsys) -> None:
    base = "data: {shards: x.tar}\noutput_dir: o\ntrain: {steps: 1}\n"
    assert parse_train_config(base).distill is None and not parse_train_config(base).distilling
    cfg = parse_train_config(base + "distill: {}\n")
    assert (
        cfg.distilling
        and cfg.distill.weight == 1.0
        and cfg.distill.loss == "bce"
        and cfg.distill.vocabulary is None
    )
    assert not parse_train_config(
        base, overrides={"distill.weight": 0}
    ).distilling  # --set distill.weight=0: off
    with pytest.raises(ConfigError) as e:
        parse_train_config(base + "distill: {weight: -1, loss: mse, vocabulary: /nonexistent.txt}\n")
    joined = "\n".join(e.value.errors)
    assert "distill.loss (line 4): expected one of ['bce', 'kl']" in joined
    with pytest.raises(ConfigError) as e:
        parse_checked_train_config(base + "distill: {weight: -1, vocabulary: /nonexistent.txt}\n")
    joined = "\n".join(e.value.errors)
    assert "distill.weight (line 4): must be >= 0" in joined and "not a file: '/nonexistent.txt'" in joined

    # shards without targets (no vocabulary.txt beside them): a usage error before any step
    cfg_path = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "run", distill={"weight": 1.0})
    assert _cli(["train", str(cfg_path)]) == 2
    assert "vocabulary.txt not found" in capsys.readouterr().err
    # a vocabulary given, but the samples have no concepts.json: the error names the sample
    (tmp_path / "v.txt").write_text("a\nb\n")
    cfg_path = make_config(
        tmp_path / "c2.yaml",
        fmnist_shards,
        tmp_path / "run2",
        distill={"vocabulary": str(tmp_path / "v.txt")},
    )
    assert _cli(["train", str(cfg_path)]) == 2
    assert "has no concepts.json" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_with_distillation(fmnist_concept_shards, tmp_path, make_config) -> None:
    """DDP wraps model and head together: 2 gloo ranks train, rank 0 saves the head beside state_dict."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    cfg = make_config(
        tmp_path / "c.yaml",
        fmnist_concept_shards,
        out,
        train={"steps": 3, "batch_size": 8},
        loss={"name": "hn_nce"},
        distill={"weight": 1.0, "loss": "kl"},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "train", str(cfg)], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["distill_loss"]) for r in recs)
    ck = torch.load(out / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["concept_head"]["weight"].shape == (len(CONCEPT_VOCABULARY), 128)
    assert not any(k.startswith(("module.", "clip.", "head.")) for k in ck["state_dict"])
