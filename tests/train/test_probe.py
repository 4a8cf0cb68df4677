"""Few-shot probes (train/probe.py): zero shots and δ = δ_b = 0 are zero-shot exactly, each fit is its problem's
optimum, δ and λ come from the shots (never the test split)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.evaluate import encode_images, retrieval_recall, zero_shot_accuracy, zero_shot_classifier
from train.probe import (
    BIAS_RADII,
    RADII,
    ProbeTask,
    _folds,
    _project,
    choose_lambda,
    choose_radii,
    draw_shots,
    few_shot_curves,
    fit_pgd,
    fit_probe,
    pgd_scores,
)


def _cli(argv: list[str]) -> int:
    """What `curate` does."""
    from curation.cli import main

    return main(argv)


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
    [zero] = [p for p in result["curves"]["zero_shot_pgd"] if p["shots"] == 0]
    assert zero["mean"] == zs.top1 and zero["std"] == 0.0 and result["zero_shot_top1"] == zs.top1
    assert [p["shots"] for p in result["curves"]["linear_probe"]] == [1]  # no plain probe without data
    one = result["curves"]["zero_shot_pgd"][1]
    assert len(one["accuracies"]) == 1 and len(one["chosen"]) == 1
    rho, rho_b = one["chosen"][0]
    assert min(abs(rho - r) for r in RADII) < 1e-12 and min(abs(rho_b - r) for r in BIAS_RADII) < 1e-12


def test_radius_zero_is_the_zero_shot_classifier_bit_for_bit(built) -> None:
    task = small_task()
    zs = zero_shot_classifier(built, task.classes, task.templates)
    scale = float(built.model.logit_scale.detach().exp())
    test_x = encode_images(built, task.test_images)
    idx, _ = draw_shots(task.train_labels, 10, 2, seed=0)
    x, y = encode_images(built, [task.train_images[i] for i in idx]), torch.as_tensor(task.train_labels[idx])
    w, b = fit_pgd(x, y, scale * zs.T.double(), 0.0, 0.0)
    assert not w.any() and not b.any()
    scores = pgd_scores(test_x, zs, scale, w, b)
    assert torch.equal(scores, (test_x @ zs).double())  # the same values, so the same predictions
    # and a radius > 0 does move it
    w, b = fit_pgd(x, y, scale * zs.T.double(), 0.5 * scale * 10**0.5, 0.0)
    assert float(w.norm()) > 0 and not torch.equal(pgd_scores(test_x, zs, scale, w, b), scores)


def _pgd_problem(seed: int = 0, n: int = 40):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=-1)
    y = torch.arange(4).repeat(n // 4)
    zs = F.normalize(torch.randn(16, 4, generator=g, dtype=torch.float64), dim=0)  # [D, C], unit columns
    return x, y, zs, 20.0


def _gradient(x, y, w0, w, b):
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = F.cross_entropy(x @ (w0 + w).T + b, y)
    return torch.autograd.grad(loss, (w, b))


def test_pgd_fit_is_the_constrained_optimum() -> None:
    """KKT of a convex problem over a convex set: the fit is a fixed point of a projected gradient step, and
    lies in the balls; the ball binds when the data pull harder than it allows."""
    x, y, zs, scale = _pgd_problem()
    w0 = scale * zs.T
    for delta, delta_b in ((0.5, 0.1), (2.0, 0.5), (5.0, 0.0), (0.0, 1.0)):
        w, b = fit_pgd(x, y, w0, delta, delta_b, max_iter=5000)
        assert float(w.norm()) <= delta + 1e-9 and float(b.norm()) <= delta_b + 1e-9
        gw, gb = _gradient(x, y, w0, w, b)
        eta = 0.5
        assert float((w - _project(w - eta * gw, delta)).norm()) < 1e-6
        assert float((b - _project(b - eta * gb, delta_b)).norm()) < 1e-6
        if delta == 0.5:
            assert float(w.norm()) == pytest.approx(0.5, rel=1e-9)  # a tight ball binds
    # The constrained loss is monotone in the radius, and never worse than zero-shot.
    losses = [
        float(F.cross_entropy(x @ (w0 + w).T + b, y))
        for w, b in (fit_pgd(x, y, w0, r, 0.0, max_iter=5000) for r in (0.0, 0.5, 2.0, 8.0))
    ]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0]


def test_the_radii_are_chosen_from_the_shots_only(built) -> None:
    """Two different test splits: the same δ choices (the test split never enters the choice)."""
    task = small_task(100)
    other = small_task(300)
    other.test_images, other.test_labels = other.test_images[100:], other.test_labels[100:]
    a = few_shot_curves(built, task, [1, 2], draws=1, probes=("zero_shot_pgd",))
    b = few_shot_curves(built, other, [1, 2], draws=1, probes=("zero_shot_pgd",))
    assert [p["chosen"] for p in a["curves"]["zero_shot_pgd"]] == [
        p["chosen"] for p in b["curves"]["zero_shot_pgd"]
    ]
    assert [p["accuracies"] for p in a["curves"]["zero_shot_pgd"]] != [
        p["accuracies"] for p in b["curves"]["zero_shot_pgd"]
    ]
    with pytest.raises(ValueError, match="unknown probe"):
        few_shot_curves(built, task, [1], probes=("pgd",))


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
    """Gaussian classes whose means the 'zero-shot' prior knows only roughly: at 1 shot (δ chosen on noisy views
    of the shots) the PGD probe beats the plain probe; with 8 shots it improves on the prior itself."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(5, 32))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    zs = F.normalize(torch.as_tensor(means + 0.3 * rng.normal(size=(5, 32)) / np.sqrt(32) * 3), dim=-1).T

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.repeat(np.arange(5), n)
        x = means[y] + 0.9 * rng.normal(size=(len(y), 32)) / np.sqrt(32) * 3
        return F.normalize(torch.as_tensor(x), dim=-1), torch.as_tensor(y)

    scale = 10.0
    test_x, test_y = sample(200)
    zero_shot = float(((test_x @ zs).argmax(1) == test_y).double().mean())
    acc: dict[tuple[str, int], list[float]] = {}
    for seed in range(3):
        rng = np.random.default_rng(seed)
        for n in (1, 8):
            x, y = sample(n)
            order = np.tile(np.arange(n), 5) if n > 1 else np.zeros(5, int)
            noisy = F.normalize(
                x.repeat_interleave(4, 0) + 0.05 * torch.randn(len(x) * 4, 32, dtype=x.dtype), dim=-1
            )
            views = (noisy, y.repeat_interleave(4))
            delta, delta_b = choose_radii(x, y, order, n, zs, scale, views if n == 1 else None)
            w, b = fit_pgd(x, y, scale * zs.T, delta, delta_b)
            pred = pgd_scores(test_x, zs, scale, w, b).argmax(1)
            acc.setdefault(("pgd", n), []).append(float((pred == test_y).double().mean()))
            lam = choose_lambda(x, y, order, n, None, 5)
            w, b = fit_probe(x, y, lam, None, 5)
            logits = test_x.double() @ w.T + b
            acc.setdefault(("plain", n), []).append(float((logits.argmax(1) == test_y).double().mean()))
    mean = {k: float(np.mean(v)) for k, v in acc.items()}
    assert mean[("pgd", 1)] > mean[("plain", 1)] + 0.05
    assert mean[("pgd", 8)] > zero_shot


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
