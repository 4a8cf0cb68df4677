"""What `curate eval` runs for one checkpoint: zero-shot accuracy, retrieval recall, few-shot probes.

The measures themselves live in train/evaluate.py (zero-shot, retrieval) and train/probe.py
(few-shot); this module picks the data and runs what was asked, returning a dict.
"""

from __future__ import annotations

from pathlib import Path

from curation.models.clip import encode_images, encode_texts, load_for_eval
from train.evaluate import read_image_folder, read_pairs, retrieval_recall, zero_shot_accuracy


class EvalError(ValueError):
    """An evaluation that cannot run as asked (no data, no checkpoint): one line for the user."""


def evaluate(
    checkpoint: str | None,
    model: str | None = None,
    *,
    device: str = "cpu",
    zero_shot: str | None = None,
    fashion_mnist_source: str = "subset",
    templates: list[str] | None = None,
    retrieval: str | None = None,
    shots: list[int] | None = None,
    task: str = "fashion-mnist",
    draws: int = 5,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Zero-shot accuracy, retrieval recall and few-shot probe curves of one checkpoint, as a dict
    (`checkpoint`, `model`, and `zero_shot` / `retrieval` / `few_shot` for what was asked)."""
    from train import fashion_mnist

    built = load_for_eval(checkpoint, model, device=device)
    results: dict = {"checkpoint": checkpoint, "model": built.name}
    if zero_shot == "fashion-mnist":
        images, labels = fashion_mnist.load("test", fashion_mnist_source)
        classes, zs_templates = fashion_mnist.CLASSES, templates or fashion_mnist.TEMPLATES
    elif zero_shot is not None:
        images, labels, classes = read_image_folder(Path(zero_shot))
        zs_templates = templates or ["a photo of a {}."]
    if zero_shot is not None:
        if limit:
            images, labels = images[:limit], labels[:limit]
        if not len(images):
            raise EvalError(f"--zero-shot {zero_shot}: no images to evaluate")
        zs = zero_shot_accuracy(built, list(images), labels, classes, zs_templates, device=device)
        results["zero_shot"] = {"dataset": zero_shot, "top1": zs.top1, "top5": zs.top5, "n": zs.n}
    if retrieval:
        from train.data import expand_shards

        imgs, caps = read_pairs(expand_shards(retrieval), limit)
        if not imgs:
            raise EvalError(f"--retrieval {retrieval}: the shards hold no image-caption pair to evaluate")
        rec = retrieval_recall(
            encode_images(built, imgs, device=device), encode_texts(built, caps, device=device)
        )
        results["retrieval"] = {"n": len(imgs), **rec}
    if shots is not None:
        from train import probe

        probe_task = probe.load_task(task, fashion_mnist_source, templates)
        if limit:
            probe_task.test_images = probe_task.test_images[:limit]
            probe_task.test_labels = probe_task.test_labels[:limit]
        results["few_shot"] = probe.few_shot_curves(
            built, probe_task, shots, draws=draws, seed=seed, device=device
        )
    return results
