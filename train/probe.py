"""DiHT's few-shot linear probe bridging zero-shot (docs/methods.md §2c), and the probes it is compared with.

Every probe classifies the model's frozen, L2-normalised image embeddings x (C
classes, n labelled shots per class), in float64, full batch:

- `zero_shot_pgd` (DiHT's probe, the default): W_0 = s · T, T the normalised
  class-prompt embeddings (the zero-shot classifier), s the model's logit scale;
  a residual W [C, D] and bias b [C] solve
      min  mean_i CE(y_i, (W_0 + W) x_i + b)   s.t.  ||W||_F <= δ,  ||b||_2 <= δ_b
  by accelerated projected gradient descent (FISTA; the projection onto a norm
  ball is a rescaling). The problem is convex, so the solution does not depend
  on the start (W = 0, b = 0). At δ = δ_b = 0 nothing moves: the predictions
  are those of `curate eval --zero-shot`, bit for bit (the probe's scores are
  the zero-shot scores plus (W x + b) / s, and that term is exactly 0).
  δ and δ_b are relative to ||W_0||_F (they are grid points ρ · ||W_0||_F).
- `linear_probe` (baseline): logits W x + b from zero, mean CE + λ ||W||²
  (weight decay), L-BFGS.
- `zero_shot_l2` (the previous variant, kept for comparison): no bias, mean CE
  + λ ||W − W_0||², L-BFGS from W_0. DiHT reports that such a penalty does not
  help (the model ignores the supervision); BENCHMARKS.md measures it.

Choosing δ, δ_b and λ never looks at the test split; only the n shots are used:
- n >= 2: leave-one-shot-out cross-validation. Fold j holds out shot j of every
  class (up to 5 folds), so every class keeps at least one training shot in
  every fold; each grid point is fitted on the rest and scored on the held-out
  shots. The one-standard-error rule picks: the smallest δ (then δ_b) whose
  held-out accuracy is within one binomial standard error of the best (a few
  held-out shots cannot tell neighbouring grid points apart; the smaller
  radius is the one closer to the zero-shot classifier).
- n = 1: no class can lose its only shot without the fold becoming a different
  problem (a class without shots is pushed down by the others: the fit then
  always prefers the zero-shot classifier, which is why λ cross-validation
  chose the largest λ at 1 shot in every draw). So the held-out data are
  `VIEWS` augmented views of the shots themselves (the model's training
  transform: random resized crops), the fit is on the plain shots, and the same
  one-standard-error rule picks. The views check that the fit generalises
  beyond the exact pixels of its shot, not to other images of the class: this
  rule leans towards larger δ than a true validation set would; BENCHMARKS.md
  reports what it chose and the accuracy against the best grid point in
  hindsight (measured on the test split for the report only, never used).
  The L-BFGS baselines at 1 shot pick λ on the same views (best accuracy, then
  cross-entropy; ties: the larger λ).

Shots are drawn per class with a seeded permutation per draw; a draw's n-shot
set contains its smaller sets (nested), so a curve within one draw changes only
by the added shots.
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

# λ candidates for the cross-validation (the L-BFGS probes), from almost no pull to almost frozen.
LAMBDAS = tuple(10.0**k for k in range(-5, 4))
# δ / ||W_0||_F and δ_b / ||W_0||_F candidates of the PGD probe (0: stay at the zero-shot classifier).
RADII = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
BIAS_RADII = (0.0, 1 / 16, 1 / 4, 1.0)
MAX_FOLDS = 5
VIEWS = 8  # augmented views per shot: the held-out data at 1 shot
PROBES = ("zero_shot_pgd", "linear_probe", "zero_shot_l2")


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


def fit_pgd(
    x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, delta: float, delta_b: float, max_iter: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising mean CE(y, (W_0 + W) x + b) with ||W||_F <= δ, ||b||_2 <= δ_b (FISTA, float64)."""
    w, b = fit_pgd_grid(x, y, w0, [delta], [delta_b], max_iter)
    return w[0], b[0]


def fit_pgd_grid(
    x: torch.Tensor,
    y: torch.Tensor,
    w0: torch.Tensor,
    deltas: Sequence[float],
    deltas_b: Sequence[float],
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_pgd for G radius pairs at once ([G, C, D], [G, C]): one batched iteration serves the whole grid.

    Step 1/L with L = λ_max(ZᵀZ)/N, Z = [x, 1], a Lipschitz bound of the mean-CE gradient (the softmax's
    curvature is at most 1). Stops when no iterate moves by more than 1e-9 of its radius.
    """
    x, w0 = x.double(), w0.double()
    (c, d), g_n = w0.shape, len(deltas)
    r_w = torch.tensor(deltas, dtype=torch.float64).clamp(min=0)
    r_b = torch.tensor(deltas_b, dtype=torch.float64).clamp(min=0)
    w = torch.zeros(g_n, c, d, dtype=torch.float64)
    b = torch.zeros(g_n, c, dtype=torch.float64)
    if not (r_w > 0).any() and not (r_b > 0).any():
        return w, b
    z = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    step = len(x) / float(torch.linalg.eigvalsh(z.T @ z)[-1])
    onehot = F.one_hot(y, c).double()
    base = x @ w0.T  # the zero-shot logits [N, C], fixed
    tol = 1e-9 * (1 + torch.maximum(r_w, r_b))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread beats several contending (as in fit_probe)
    try:
        return _fista(x, base, onehot, w, b, r_w, r_b, step, tol, max_iter)
    finally:
        torch.set_num_threads(threads)


def _fista(x, base, onehot, w, b, r_w, r_b, step, tol, max_iter) -> tuple[torch.Tensor, torch.Tensor]:
    wy, by, t = w, b, 1.0
    for _ in range(max_iter):
        logits = base + torch.einsum("nd,gcd->gnc", x, wy) + by[:, None, :]
        grad = (torch.softmax(logits, dim=2) - onehot) / len(x)  # [G, N, C]
        w_new = _project_rows(wy - step * torch.einsum("gnc,nd->gcd", grad, x), r_w)
        b_new = _project_rows(by - step * grad.sum(1), r_b)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        moved = (w_new - w).flatten(1).norm(dim=1) + (b_new - b).norm(dim=1)
        wy = w_new + (t - 1) / t_new * (w_new - w)
        by = b_new + (t - 1) / t_new * (b_new - b)
        w, b, t = w_new, b_new, t_new
        if bool((moved <= tol).all()):
            break
    return w, b


def _project_rows(v: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Each v[g] projected onto the Euclidean (Frobenius) ball of radius radii[g]."""
    norms = v.flatten(1).norm(dim=1)
    factor = torch.where(norms > radii, radii / norms.clamp(min=1e-300), torch.ones_like(norms))
    return v * factor.view(-1, *([1] * (v.dim() - 1)))


def _project(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Euclidean projection onto the ball of `radius` (the Frobenius ball for a matrix)."""
    return _project_rows(v[None], torch.tensor([max(radius, 0.0)], dtype=v.dtype))[0]


def pgd_scores(
    x: torch.Tensor, zs_weights: torch.Tensor, scale: float, w: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """Class scores of the PGD probe in zero-shot units: x @ T + (W x + b) / s (same argmax as its logits).

    The first term is computed exactly as `curate eval --zero-shot` does (float32 matmul), so W = 0, b = 0
    gives the zero-shot predictions bit for bit.
    """
    return (x @ zs_weights).double() + (x.double() @ w.T + b) / scale


def _folds(shot_index: np.ndarray, labels: np.ndarray, shots: int) -> list[np.ndarray]:
    """Held-out masks for the L-BFGS baselines: shot j of every class in fold j mod K; 1 shot: every other class."""
    if shots >= 2:
        k = min(shots, MAX_FOLDS)
        return [shot_index % k == f for f in range(k)]
    return [labels % 2 == f for f in range(2)]


def _shot_folds(shot_index: np.ndarray, shots: int) -> list[np.ndarray]:
    """Held-out masks with n >= 2 shots: shot j of every class in fold j mod K, so no class loses all its shots."""
    k = min(shots, MAX_FOLDS)
    return [shot_index % k == f for f in range(k)]


def _held_out_score(scores: torch.Tensor, y: torch.Tensor) -> tuple[int, float]:
    """(correct, −summed CE): larger is better, compared as a tuple (accuracy first, CE breaks ties)."""
    correct = int((scores.argmax(dim=1) == y).sum())
    return correct, -float(F.cross_entropy(scores, y, reduction="sum"))


def choose_radii(
    x: torch.Tensor,
    y: torch.Tensor,
    shot_index: np.ndarray,
    shots: int,
    zs_weights: torch.Tensor,
    scale: float,
    views: tuple[torch.Tensor, torch.Tensor] | None = None,
    radii: Sequence[float] = RADII,
    bias_radii: Sequence[float] = BIAS_RADII,
) -> tuple[float, float]:
    """(δ, δ_b) of the grid with the best held-out accuracy, then CE (module docstring); never the test split.

    `views` (features, labels) of augmented views of the shots: the held-out data when shots == 1.
    """
    w0 = scale * zs_weights.T.double()
    unit = float(w0.norm())
    if shots >= 2:
        splits = [(~torch.as_tensor(h), torch.as_tensor(h)) for h in _shot_folds(shot_index, shots)]
        evals = [(x[tr], y[tr], x[ho], y[ho]) for tr, ho in splits]
    else:
        if views is None:
            raise ValueError("1 shot per class: choosing δ needs augmented views of the shots")
        evals = [(x, y, views[0], views[1])]
    grid = [(rho, rho_b) for rho in radii for rho_b in bias_radii]
    correct = np.zeros(len(grid), dtype=np.int64)
    neg_ce = np.zeros(len(grid))
    for xt, yt, xh, yh in evals:
        ws, bs = fit_pgd_grid(xt, yt, w0, [r * unit for r, _ in grid], [r * unit for _, r in grid])
        for g in range(len(grid)):
            # The logits the probe was trained with, (W_0 + W) x + b: its CE is in the trained units.
            c, n = _held_out_score(scale * pgd_scores(xh, zs_weights, scale, ws[g], bs[g]), yh)
            correct[g] += c
            neg_ce[g] += n
    # One-standard-error rule (Breiman et al.): the smallest radii whose held-out accuracy is within one
    # binomial standard error of the best; a few held-out points cannot tell closer grid points apart.
    n_held = sum(len(e[3]) for e in evals)
    top = max(range(len(grid)), key=lambda i: (correct[i], neg_ce[i]))
    acc = correct[top] / n_held
    floor = correct[top] - n_held * math.sqrt(acc * (1 - acc) / n_held)
    g = next(i for i in range(len(grid)) if correct[i] >= floor)  # grid is sorted: smaller δ, then δ_b, first
    best = (grid[g][0] * unit, grid[g][1] * unit)
    return best


def choose_lambda_views(
    x: torch.Tensor,
    y: torch.Tensor,
    views: tuple[torch.Tensor, torch.Tensor],
    prior: torch.Tensor | None,
    num_classes: int,
    grid: Sequence[float] = LAMBDAS,
) -> float:
    """The L-BFGS probes' λ at 1 shot, by the same rule as the PGD probe (fit on the shots, score the views)."""
    best, best_key = grid[-1], None
    for lam in sorted(grid, reverse=True):
        w, b = fit_probe(x, y, lam, prior, num_classes)
        key = _held_out_score(_logits(views[0], w, b), views[1])
        if best_key is None or key > best_key:
            best, best_key = lam, key
    return best


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


@torch.no_grad()
def encode_views(
    built: BuiltModel, images: Sequence, views: int, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """[len(images) · views, D] normalised embeddings of `views` training-transform views of each image
    (image-major), with a seeded torch RNG so that a draw's views are reproducible."""
    from PIL import Image

    pils = [(Image.fromarray(im) if isinstance(im, np.ndarray) else im).convert("RGB") for im in images]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.stack([built.preprocess_train(im) for im in pils for _ in range(views)]).to(device)
    return F.normalize(built.model.encode_image(x).float(), dim=-1).cpu()


def few_shot_curves(
    built: BuiltModel,
    task: ProbeTask,
    shots: Sequence[int],
    draws: int = 5,
    seed: int = 0,
    device: str = "cpu",
    grid: Sequence[float] = LAMBDAS,
    probes: Sequence[str] = ("zero_shot_pgd", "linear_probe"),
    hindsight: bool = False,
) -> dict[str, Any]:
    """Test accuracy (mean and std over draws) per shot count for each of `probes`; see the module docstring.

    `hindsight`: also record, per draw, the PGD probe's test accuracy at the grid point that was best *on the
    test split* (`zero_shot_pgd_hindsight`): the ceiling of the δ choice, for benchmarks; never a method.
    """
    shots = sorted(set(int(n) for n in shots))
    if not shots or shots[0] < 0:
        raise ValueError("shot counts must be >= 0")
    if draws < 1:
        raise ValueError("draws must be >= 1")
    unknown = sorted(set(probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; known: {list(PROBES)}")
    c = len(task.classes)
    zs_weights = zero_shot_classifier(built, task.classes, task.templates, device=device)  # [D, C]
    scale = float(built.model.logit_scale.detach().exp())
    prior = scale * zs_weights.T.double()  # W_0 [C, D]
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

    names = list(probes) + (["zero_shot_pgd_hindsight"] if hindsight else [])
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for n in shots:
        if n == 0:
            for name in names:
                if name != "linear_probe":  # no plain probe without data
                    curves[name].append(_point(0, [zero_shot], [None]))
            continue
        accs: dict[str, list[float]] = {name: [] for name in names}
        chosen: dict[str, list[Any]] = {name: [] for name in names}
        for d, (idx, order) in enumerate(drawn):
            take = order < n  # the first n shots of every class in this draw
            assert features is not None
            x = features[[pos[int(i)] for i in idx[take]]]
            y = torch.as_tensor(task.train_labels[idx[take]])
            views = None
            if n == 1:
                vx = encode_views(
                    built, [task.train_images[int(i)] for i in idx[take]], VIEWS, seed + d, device
                )
                views = (vx, y.repeat_interleave(VIEWS))
            for name in names:
                if name in ("zero_shot_pgd", "zero_shot_pgd_hindsight"):
                    if name == "zero_shot_pgd":
                        delta, delta_b = choose_radii(x, y, order[take], n, zs_weights, scale, views)
                    else:
                        delta, delta_b = _best_on_test(x, y, zs_weights, scale, test_x, test_y)
                    w, b = fit_pgd(x, y, prior, delta, delta_b)
                    scores = pgd_scores(test_x, zs_weights, scale, w, b)
                    unit = float(prior.norm())
                    chosen[name].append([delta / unit, delta_b / unit])
                else:
                    p = prior if name == "zero_shot_l2" else None
                    if n == 1:
                        assert views is not None
                        lam = choose_lambda_views(x, y, views, p, c, grid)
                    else:
                        lam = choose_lambda(x, y, order[take], n, p, c, grid)
                    w_l, b_l = fit_probe(x, y, lam, p, c)
                    scores = _logits(test_x, w_l, b_l)
                    chosen[name].append(lam)
                accs[name].append(classification_accuracy(scores, test_y.numpy()).top1)
        for name in names:
            curves[name].append(_point(n, accs[name], chosen[name]))
    return {
        "task": task.name,
        "classes": c,
        "n_test": len(task.test_labels),
        "draws": draws,
        "seed": seed,
        "shots": shots,
        "zero_shot_top1": zero_shot,
        "logit_scale": scale,
        "lambda_grid": list(grid),
        "radius_grid": {"delta": list(RADII), "delta_b": list(BIAS_RADII), "unit": "||W_0||_F"},
        "curves": curves,
    }


def _best_on_test(x, y, zs_weights, scale, test_x, test_y) -> tuple[float, float]:
    """The grid point with the best *test* accuracy (benchmarks' hindsight ceiling only)."""
    w0 = scale * zs_weights.T.double()
    unit = float(w0.norm())
    grid = [(rho * unit, rho_b * unit) for rho in RADII for rho_b in BIAS_RADII]
    ws, bs = fit_pgd_grid(x, y, w0, [r for r, _ in grid], [r for _, r in grid])
    accs = [float((pgd_scores(test_x, zs_weights, scale, ws[g], bs[g]).argmax(1) == test_y).double().mean())
            for g in range(len(grid))]  # fmt: skip
    best = grid[int(np.argmax(accs))]
    return best


def _point(shots: int, accs: list[float], chosen: list[Any]) -> dict[str, Any]:
    """One curve point; `chosen`: per draw, λ (L-BFGS probes) or [δ, δ_b] / ||W_0||_F (PGD)."""
    return {
        "shots": shots,
        "mean": float(np.mean(accs)),
        # sample standard deviation over draws (n-1); 0 for a single value
        "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
        "accuracies": accs,
        "chosen": chosen,
    }


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Accuracy vs shots per class, both probes with their std over draws; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels = {
        "zero_shot_pgd": "zero-shot + residual in norm balls, PGD (DiHT)",
        "zero_shot_pgd_hindsight": "the same, δ best on test (ceiling)",
        "zero_shot_l2": "zero-shot initialised, λ||W − W_0||²",
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
    import io

    from curation.core.storage import open_store

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    open_store(Path(path).parent).put_bytes(Path(path).name, buf.getvalue())
    return path
