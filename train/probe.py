"""DiHT's few-shot linear probe bridging zero-shot (docs/methods.md §2c), and the plain linear probe it is compared with.

Both probes classify the model's frozen, L2-normalised image embeddings x with
a linear layer, trained full-batch with L-BFGS in float64 on the n labelled
shots per class (a convex problem: the optimum does not depend on the start):

- zero-shot initialised (ours): logits = W x, with W starting at
  W_zs = logit_scale · T, T the normalised class-prompt embeddings (the
  zero-shot classifier), and the objective
      mean cross-entropy(W x, y) + λ ||W − W_zs||².
  No bias, so λ → ∞ (and n = 0) is exactly the zero-shot classifier; as n
  grows the data outweigh the pull and it tends to a plain linear probe.
- plain linear probe (baseline): logits = W x + b from zero, objective
  mean cross-entropy + λ ||W||² (its own regulariser, no zero-shot start).

λ is chosen for each probe and draw by cross-validation on the shots only
(the test split is never looked at): folds hold out one shot per class in
turn (up to 5 folds; with 1 shot, half of the classes' shots per fold), every
λ of the grid is fitted on the rest, and the λ with the best held-out accuracy
wins (ties: the larger λ, the stronger prior). The winner is refitted on all
shots and scored on the test split.

Shots are drawn per class with a seeded permutation per draw; a draw's
n-shot set contains its smaller sets (nested), so a curve within one draw
changes only by the added shots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from curation.models.clip import BuiltModel, encode_images, zero_shot_classifier
from train.evaluate import classification_accuracy

# λ candidates for the cross-validation (both probes), from almost no pull to almost frozen.
LAMBDAS = tuple(10.0**k for k in range(-5, 4))
MAX_FOLDS = 5


@dataclass
class ProbeTask:
    """Labelled images of one task: a pool to draw shots from, and a test split."""

    name: str
    classes: list[str]
    templates: list[str]
    train_images: Sequence[Any]
    train_labels: np.ndarray
    test_images: Sequence[Any]
    test_labels: np.ndarray


def load_task(task: str, source: str = "subset", templates: list[str] | None = None) -> ProbeTask:
    """`fashion-mnist` (built in; `source` subset or debian), or DIR with DIR/train/CLASS/* and DIR/test/CLASS/*."""
    if task == "fashion-mnist":
        from train import fashion_mnist

        train_x, train_y = fashion_mnist.load("train", source)  # type: ignore[arg-type]
        test_x, test_y = fashion_mnist.load("test", source)  # type: ignore[arg-type]
        return ProbeTask(
            task,
            list(fashion_mnist.CLASSES),
            templates or list(fashion_mnist.TEMPLATES),
            list(train_x),
            np.asarray(train_y),
            list(test_x),
            np.asarray(test_y),
        )
    from train.evaluate import read_image_folder

    root = Path(task)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"--task: not 'fashion-mnist' and not a folder with train/ and test/: {task}")
    train_x, train_y, classes = read_image_folder(root / "train")
    test_x, test_y, test_classes = read_image_folder(root / "test")
    if classes != test_classes:
        raise ValueError(f"{task}: train/ and test/ have different class folders")
    return ProbeTask(
        root.name,
        classes,
        templates or ["a photo of a {}."],
        train_x,
        np.asarray(train_y),
        test_x,
        np.asarray(test_y),
    )


# --------------------------------------------------------------------------- fitting


def fit_probe(
    x: torch.Tensor, y: torch.Tensor, lam: float, prior: torch.Tensor | None, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """argmin_W mean CE(W x (+ b), y) + λ ||W − P||², float64 L-BFGS.

    `prior` P [C, D]: the zero-shot classifier (ours; no bias, start at P), or
    None for the plain probe (P = 0, with a bias, start at 0).
    """
    x = x.double()
    if prior is None:
        w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        params, anchor = [w, b], torch.zeros_like(w)
    else:
        anchor = prior.double()
        w = anchor.clone().requires_grad_(True)
        b = None
        params = [w]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=300,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        logits = x @ w.T + (b if b is not None else 0.0)
        loss = F.cross_entropy(logits, y) + lam * (w - anchor).pow(2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    # A few thousand parameters: one thread is ~10x faster than several contending over tiny matmuls.
    torch.set_num_threads(1)
    try:
        opt.step(objective)
    finally:
        torch.set_num_threads(threads)
    return w.detach(), (b.detach() if b is not None else None)


def _folds(shot_index: np.ndarray, labels: np.ndarray, shots: int) -> list[np.ndarray]:
    """Held-out masks: shot j of every class in fold j mod K; with 1 shot, every other class."""
    if shots >= 2:
        k = min(shots, MAX_FOLDS)
        return [shot_index % k == f for f in range(k)]
    return [labels % 2 == f for f in range(2)]


def choose_lambda(
    x: torch.Tensor,
    y: torch.Tensor,
    shot_index: np.ndarray,
    shots: int,
    prior: torch.Tensor | None,
    num_classes: int,
    grid: Sequence[float] = LAMBDAS,
) -> float:
    """The λ with the best cross-validated accuracy on the shots (ties: the larger λ)."""
    folds = _folds(shot_index, y.numpy(), shots)
    best, best_acc = grid[-1], -1.0
    for lam in sorted(grid, reverse=True):  # strict '>' below keeps the larger λ on ties
        correct = 0
        for held in folds:
            held_t = torch.as_tensor(held)
            w, b = fit_probe(x[~held_t], y[~held_t], lam, prior, num_classes)
            pred = _logits(x[held_t], w, b).argmax(dim=1)
            correct += int((pred == y[held_t]).sum())
        acc = correct / len(y)
        if acc > best_acc:
            best, best_acc = lam, acc
    return best


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    logits = x.double() @ w.T
    return logits + b if b is not None else logits


# --------------------------------------------------------------------------- curves


def draw_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, shot index within class) of `shots` examples per class; nested in `shots` for one seed."""
    rng = np.random.default_rng(seed)
    idx, order = [], []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < shots:
            raise ValueError(f"class {c} has {len(pool)} examples, fewer than {shots} shots")
        idx.append(rng.permutation(pool)[:shots])
        order.append(np.arange(shots))
    return np.concatenate(idx), np.concatenate(order)


def few_shot_curves(
    built: BuiltModel,
    task: ProbeTask,
    shots: Sequence[int],
    draws: int = 5,
    seed: int = 0,
    device: str = "cpu",
    grid: Sequence[float] = LAMBDAS,
) -> dict[str, Any]:
    """Test accuracy (mean and std over draws) per shot count, for both probes; see the module docstring."""
    shots = sorted(set(int(n) for n in shots))
    if not shots or shots[0] < 0:
        raise ValueError("shot counts must be >= 0")
    if draws < 1:
        raise ValueError("draws must be >= 1")
    c = len(task.classes)
    zs_weights = zero_shot_classifier(built, task.classes, task.templates, device=device)  # [D, C]
    scale = float(built.model.logit_scale.detach().exp())
    prior = scale * zs_weights.T.double()  # W_zs [C, D]
    test_x = encode_images(built, task.test_images, device=device)
    test_y = torch.as_tensor(task.test_labels)

    # The zero-shot classifier exactly as `curate eval --zero-shot` computes it (same features and matmul).
    zero_shot = classification_accuracy(test_x @ zs_weights, task.test_labels).top1
    most = max(shots)
    # Each draw's largest shot set contains its smaller ones: encode only those images.
    drawn = [draw_shots(task.train_labels, c, most, seed + d) for d in range(draws)] if most > 0 else []
    needed = sorted({int(i) for idx, _ in drawn for i in idx})
    pos = {i: k for k, i in enumerate(needed)}
    features = encode_images(built, [task.train_images[i] for i in needed], device=device) if needed else None

    curves: dict[str, list[dict[str, Any]]] = {"zero_shot_init": [], "linear_probe": []}
    for n in shots:
        if n == 0:
            curves["zero_shot_init"].append(_point(0, [zero_shot], [math.inf]))
            continue
        accs: dict[str, list[float]] = {"zero_shot_init": [], "linear_probe": []}
        lams: dict[str, list[float]] = {"zero_shot_init": [], "linear_probe": []}
        for idx, order in drawn:
            take = order < n  # the first n shots of every class in this draw
            assert features is not None
            x = features[[pos[int(i)] for i in idx[take]]]
            y = torch.as_tensor(task.train_labels[idx[take]])
            for name, p in (("zero_shot_init", prior), ("linear_probe", None)):
                lam = choose_lambda(x, y, order[take], n, p, c, grid)
                w, b = fit_probe(x, y, lam, p, c)
                accs[name].append(classification_accuracy(_logits(test_x, w, b), test_y.numpy()).top1)
                lams[name].append(lam)
        for name in curves:
            curves[name].append(_point(n, accs[name], lams[name]))
    return {
        "task": task.name,
        "classes": c,
        "n_test": len(task.test_labels),
        "draws": draws,
        "seed": seed,
        "shots": shots,
        "zero_shot_top1": zero_shot,
        "lambda_grid": list(grid),
        "curves": curves,
    }


def _point(shots: int, accs: list[float], lams: list[float]) -> dict[str, Any]:
    return {
        "shots": shots,
        "mean": float(np.mean(accs)),
        # sample standard deviation over draws (n-1); 0 for a single value
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "accuracies": accs,
        "lambdas": [None if math.isinf(v) else v for v in lams],
    }


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Accuracy vs shots per class, both probes with their std over draws; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels = {
        "zero_shot_init": "zero-shot initialised, λ||W − W_zs||² (DiHT)",
        "linear_probe": "plain linear probe, λ||W||²",
    }
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in result["curves"].items():
        if not points:
            continue
        xs = [p["shots"] for p in points]
        ax.errorbar(
            xs,
            [p["mean"] for p in points],
            yerr=[p["std"] for p in points],
            marker="o",
            capsize=3,
            label=labels.get(name, name),
        )
    ax.axhline(1 / result["classes"], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(result["shots"], [str(n) for n in result["shots"]])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_title(f"few-shot probes on {result['task']} ({result['draws']} draws, mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
