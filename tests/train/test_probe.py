"""Few-shot probes (train/probe.py): zero shots is zero-shot exactly, the fit is the optimum, λ comes from the shots."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.evaluate import retrieval_recall, zero_shot_accuracy
from train.probe import LAMBDAS, ProbeTask, _folds, choose_lambda, draw_shots, few_shot_curves, fit_probe


def _cli(argv: list[str]) -> int:
    from train.cli import register

    parser = argparse.ArgumentParser(prog="curate")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def built():
    from curation.models.clip import build_model

    torch.manual_seed(0)
    b = build_model("curate-tiny")
    b.model.eval()
    return b


def small_task(n_test: int = 300) -> ProbeTask:
    from train import fashion_mnist

    train_x, train_y = fashion_mnist.load("train")
    test_x, test_y = fashion_mnist.load("test")
    return ProbeTask(
        "fashion-mnist",
        list(fashion_mnist.CLASSES),
        list(fashion_mnist.TEMPLATES),
        list(train_x),
        train_y,
        list(test_x[:n_test]),
        test_y[:n_test],
    )


def test_zero_shots_is_the_zero_shot_accuracy_exactly(built) -> None:
    task = small_task()
    result = few_shot_curves(built, task, [0, 1], draws=1)
    zs = zero_shot_accuracy(built, task.test_images, task.test_labels, task.classes, task.templates)
    [zero] = [p for p in result["curves"]["zero_shot_init"] if p["shots"] == 0]
    assert zero["mean"] == zs.top1 and zero["std"] == 0.0 and result["zero_shot_top1"] == zs.top1
    assert [p["shots"] for p in result["curves"]["linear_probe"]] == [1]  # no plain probe without data
    one = result["curves"]["zero_shot_init"][1]
    assert len(one["accuracies"]) == 1 and all(v in LAMBDAS for v in one["lambdas"])


def _objective(x, y, w, b, lam, anchor):
    w = w.clone().requires_grad_(True)
    logits = x.double() @ w.T + (b if b is not None else 0.0)
    loss = F.cross_entropy(logits, y) + lam * (w - anchor).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, w)
    return grad


def test_fit_is_the_regularised_optimum_and_bridges_to_zero_shot() -> None:
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(40, 16, generator=g, dtype=torch.float64), dim=-1)
    y = torch.arange(4).repeat(10)
    prior = 20 * F.normalize(torch.randn(4, 16, generator=g, dtype=torch.float64), dim=-1)
    for lam in (1e-3, 1e-1, 10.0):
        w, b = fit_probe(x, y, lam, prior, 4)
        assert b is None and _objective(x, y, w, None, lam, prior).norm() < 1e-6  # stationary: the optimum
        w, b = fit_probe(x, y, lam, None, 4)
        assert b is not None and _objective(x, y, w, b, lam, torch.zeros_like(w)).norm() < 1e-6
    # strong pull: the zero-shot classifier itself; no pull: far from it
    w_strong, _ = fit_probe(x, y, 1e6, prior, 4)
    torch.testing.assert_close(w_strong, prior, atol=1e-4, rtol=0)
    w_free, _ = fit_probe(x, y, 1e-5, prior, 4)
    assert (w_free - prior).norm() > 1.0


def test_cross_validation_folds_use_the_shots_only() -> None:
    labels = np.repeat(np.arange(5), 4)
    order = np.tile(np.arange(4), 5)
    folds = _folds(order, labels, 4)
    assert len(folds) == 4 and np.array_equal(sum(f.astype(int) for f in folds), np.ones(20, int))
    assert all(np.array_equal(np.sort(labels[f]), np.arange(5)) for f in folds)  # one shot per class each
    folds = _folds(np.zeros(5, int), np.arange(5), 1)  # 1 shot: half of the classes per fold
    assert [labels.tolist() for labels in (np.arange(5)[f] for f in folds)] == [[0, 2, 4], [1, 3]]
    assert len(_folds(np.tile(np.arange(16), 2), np.repeat([0, 1], 16), 16)) == 5

    # nested draws: the 2-shot set of a seed contains its 1-shot set
    labels = np.repeat(np.arange(3), 50)
    idx, order = draw_shots(labels, 3, 4, seed=7)
    assert len(idx) == 12 and set(labels[idx]) == {0, 1, 2}
    idx1 = idx[order < 1]
    assert set(idx1) <= set(idx[order < 2]) and len(idx1) == 3


def test_a_good_prior_helps_at_one_shot_and_the_data_win_later() -> None:
    """Gaussian classes whose means the 'zero-shot' prior knows: at 1 shot ours beats the plain probe."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(5, 32))
    means /= np.linalg.norm(means, axis=1, keepdims=True)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.repeat(np.arange(5), n)
        x = means[y] + 0.9 * rng.normal(size=(len(y), 32)) / np.sqrt(32) * 3
        return F.normalize(torch.as_tensor(x), dim=-1), torch.as_tensor(y)

    prior = 10 * torch.as_tensor(means)
    test_x, test_y = sample(200)
    acc = {}
    for name, p in (("ours", prior), ("plain", None)):
        scores = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            x, y = sample(1)
            lam = choose_lambda(x, y, np.zeros(5, int), 1, p, 5)
            w, b = fit_probe(x, y, lam, p, 5)
            logits = test_x.double() @ w.T + (b if b is not None else 0)
            scores.append(float((logits.argmax(1) == test_y).double().mean()))
        acc[name] = np.mean(scores)
    assert acc["ours"] > acc["plain"] + 0.05


def test_retrieval_recall_with_groups() -> None:
    img = torch.eye(4)
    txt = torch.tensor([[0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    plain = retrieval_recall(img, txt, (1,))
    assert plain["image_to_text_R@1"] == 0.5  # images 0 and 1 find each other's caption
    grouped = retrieval_recall(img, txt, (1,), groups=[7, 7, 1, 2])  # 0 and 1 are one class
    assert grouped["image_to_text_R@1"] == 1.0 and grouped["text_to_image_R@1"] == 1.0
    assert retrieval_recall(img, txt, (1,), groups=[0, 1, 2, 3]) == plain


def test_cli_few_shot_writes_json_and_plot(fmnist_shards, tmp_path, make_config, capsys) -> None:
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "run", train={"steps": 2})
    assert _cli(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert _cli(["eval", str(cfg), "--few-shot", "2,0", "--draws", "1", "--limit", "100"]) == 0
    path = tmp_path / "run" / "few_shot_fashion-mnist.json"
    result = json.loads(path.read_text())["few_shot"]
    assert result["shots"] == [0, 2] and result["n_test"] == 100 and result["draws"] == 1
    assert [p["shots"] for p in result["curves"]["linear_probe"]] == [2]
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "zero_shot" not in json.loads(path.read_text())  # --few-shot replaces the default zero-shot run

    assert _cli(["eval", str(cfg), "--few-shot", "1,x"]) == 2
    assert "--few-shot: expected comma-separated integers" in capsys.readouterr().err
    ck = str(tmp_path / "run" / "checkpoints" / "step_00000002.pt")
    assert _cli(["eval", "--checkpoint", ck, "--few-shot", "1"]) == 2  # no config: --json is required
    assert "give --json PATH" in capsys.readouterr().err
