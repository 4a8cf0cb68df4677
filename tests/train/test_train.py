"""The loop end to end on real shards and the real tiny open_clip model (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.config import load_train_config
from train.loop import list_checkpoints, train


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(argv: list[str]) -> int:
    """What `curate` does."""
    from curation.cli import main

    return main(argv)


def test_run_writes_metrics_and_open_clip_loadable_checkpoint(fmnist_shards, tmp_path, make_config) -> None:
    out = tmp_path / "run"
    cfg = load_train_config(
        make_config(tmp_path / "c.yaml", fmnist_shards, out, train={"checkpoint_every": 2})
    )
    result = train(cfg)
    assert result.steps == 4 and result.checkpoint == out / "checkpoints" / "step_00000004.pt"
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002.pt", "step_00000004.pt"]
    recs = _metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert set(recs[0]) == {"step", "loss", "lr", "logit_scale", "samples_per_s", "mem_gb"}
    assert recs[0]["lr"] == pytest.approx(1e-3 / 2)  # warm-up: (step+1)/warmup of the base lr
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 for r in recs)

    # The checkpoint is an open_clip checkpoint: open_clip loads it by name + path, strictly.
    import open_clip

    from curation.models.clip import MODEL_CONFIG_DIR, build_model

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    oc_model, _, _ = open_clip.create_model_and_transforms("curate-tiny", pretrained=str(result.checkpoint))
    ours = build_model("curate-tiny", str(result.checkpoint)).model
    oc_model.eval()
    ours.eval()
    x = torch.randn(2, 3, 28, 28)
    tokens = open_clip.get_tokenizer("curate-tiny")(["a photo of a bag.", "a sneaker."])
    with torch.no_grad():
        assert torch.equal(oc_model.encode_image(x), ours.encode_image(x))
        assert torch.equal(oc_model.encode_text(tokens), ours.encode_text(tokens))
    state = torch.load(result.checkpoint, weights_only=True)
    assert {"state_dict", "optimizer", "scheduler", "scaler", "step", "rng"} <= set(state) and state[
        "step"
    ] == 4


def test_resume_repeats_the_uninterrupted_loss_curve(fmnist_shards, tmp_path, make_config) -> None:
    sections = {
        "train": {"steps": 6, "checkpoint_every": 3},
        "data": {"workers": 2},
        "loss": {"name": "hn_nce", "alpha": 1.0, "beta": 0.5},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "grad_clip_norm": 1.0},
    }
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train(load_train_config(make_config(tmp_path / "full.yaml", fmnist_shards, full_dir, **sections)))
    split_cfg = make_config(tmp_path / "split.yaml", fmnist_shards, split_dir, **sections)
    # Simulate a crash after step 4: keep only the step-3 checkpoint and the metrics up to step 4
    # (step 4 logged but never checkpointed); --resume must redo steps 4-6 identically.
    train(load_train_config(split_cfg))
    for p in list_checkpoints(split_dir)[1:]:
        p.unlink()
    lines = (split_dir / "metrics.jsonl").read_text().splitlines()
    (split_dir / "metrics.jsonl").write_text(
        "\n".join([*lines[:3], lines[4]]) + "\n"
    )  # a crash after step 4 logged
    assert _cli(["train", str(split_cfg), "--resume"]) == 0

    full, resumed = _metrics(full_dir), _metrics(split_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
    w_full = torch.load(full_dir / "checkpoints" / "step_00000006.pt", weights_only=True)["state_dict"]
    w_res = torch.load(split_dir / "checkpoints" / "step_00000006.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(w_full[k], w_res[k], atol=1e-6) for k in w_full)


@pytest.mark.parametrize(
    "sections",
    [
        {"train": {"precision": "bf16", "steps": 2}},
        {"train": {"precision": "amp", "steps": 2}, "optim": {"grad_clip_norm": 1.0}},
        {"train": {"grad_checkpointing": True, "steps": 2}, "loss": {"name": "hn_nce"}},
        {"train": {"epochs": 0.125, "steps": None}},  # 512 samples x 0.125 / 16 = 4 steps
    ],
    ids=["bf16", "amp", "grad-checkpointing-hn-nce", "epochs"],
)
def test_precisions_and_options(fmnist_shards, tmp_path, make_config, sections) -> None:
    out = tmp_path / "run"
    result = train(load_train_config(make_config(tmp_path / "c.yaml", fmnist_shards, out, **sections)))
    recs = _metrics(out)
    assert len(recs) == result.steps == (4 if "epochs" in sections["train"] else 2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


def test_cli_train_and_eval(fmnist_shards, tmp_path, make_config, capsys) -> None:
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "run")
    assert _cli(["train", str(cfg), "--set", "train.steps=2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["checkpoint"].endswith("step_00000002.pt")

    rc = _cli(
        [
            "eval",
            str(cfg),
            "--limit",
            "64",
            "--retrieval",
            str(fmnist_shards / "00000.tar"),
            "--zero-shot",
            "fashion-mnist",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    assert (
        res["model"] == "curate-tiny" and res["zero_shot"]["n"] == 64 and 0 <= res["zero_shot"]["top1"] <= 1
    )
    assert res["retrieval"]["n"] == 64 and set(res["retrieval"]) >= {
        "image_to_text_R@1",
        "text_to_image_R@10",
    }

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {shards: x.tar}\noutput_dir: o\ntrain: {steps: 1, batchsize: 3}\n")
    assert _cli(["train", str(bad)]) == 2
    assert "train.batchsize (line 3): unknown key" in capsys.readouterr().err
    assert _cli(["train", str(cfg), "--set", f"data.shards={tmp_path}/none-*.tar"]) == 2


def test_a_failed_start_leaves_no_output_folder(fmnist_shards, tmp_path, make_config, capsys) -> None:
    out = tmp_path / "run"
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.tar").write_bytes(b"not a tar file " * 200)
    for overrides, code in (
        ([f"data.shards={tmp_path}/none-*.tar"], 2),  # no shards
        (["model.name=no-such-model"], 2),  # unknown architecture
        (["train.steps=null", "train.epochs=1", f"data.sizes={tmp_path}/none.json"], 2),  # no sizes
        ([f"data.shards={broken}/00000.tar"], 2),  # not a tar: refused before the first step
    ):
        argv = ["train", str(cfg)] + [x for o in overrides for x in ("--set", o)]
        assert _cli(argv) == code, (overrides, capsys.readouterr().err[-2000:])
        assert not out.exists(), overrides
    assert _cli(["train", str(cfg), "--set", "train.steps=1"]) == 0
    assert (out / "config.json").exists() and list_checkpoints(out)


def test_retrieval_recall_definition() -> None:
    from train.evaluate import retrieval_recall

    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # captions 2 and 3 swapped
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["image_to_text_R@1"] == 0.5 and r["text_to_image_R@1"] == 0.5
    assert r["image_to_text_R@2"] == 1.0  # the true caption is second for images 2 and 3
