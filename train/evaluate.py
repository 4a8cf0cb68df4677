"""Zero-shot classification and image-text retrieval for a checkpoint.

Zero-shot: a classifier from the mean normalised text embedding of each class's
prompts (templates x class names), top-1/top-5 accuracy on labelled images.
Retrieval: recall@1/5/10 in both directions over image-caption pairs (webdataset
shards); the ground truth of image i is caption i and vice versa.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from curation.core.folders import FileRefused, read_named_file
from curation.models.clip import BuiltModel, encode_images, zero_shot_classifier

log = logging.getLogger("train")

MAX_TEMPLATES_BYTES = 2**20
MAX_TEMPLATE_CHARS = 1000  # a prompt is a sentence; the text tower reads 77 tokens of it anyway


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates from a user's file, one a line, each with exactly one plain `{}` for the
    class name. Anything else `str.format` would act on (`{1}`, `{x}`, `{:>2000000000}`, a stray
    brace) is refused with the line number, before a 2 GB string or a KeyError can happen."""
    try:
        text = read_named_file(path, MAX_TEMPLATES_BYTES).decode("utf-8")
    except FileRefused as e:
        raise ValueError(f"--templates {e.detail}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--templates {path}: not UTF-8 text") from None
    templates = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        where = f"--templates {path}, line {number}"
        if len(line) > MAX_TEMPLATE_CHARS:
            raise ValueError(f"{where}: {len(line):,} characters (at most {MAX_TEMPLATE_CHARS:,})")
        try:
            fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(line) if f is not None]
        except ValueError as e:
            raise ValueError(f"{where}: {e} (write a literal brace as {{{{ or }}}})") from None
        if fields != [("", "", None)]:
            raise ValueError(f"{where}: needs exactly one plain {{}} for the class name, got {line!r}")
        templates.append(line)
    if not templates:
        raise ValueError(f"--templates {path}: no templates (one a line, each with {{}})")
    return templates


@dataclass
class ZeroShotResult:
    top1: float
    top5: float
    n: int


def zero_shot_accuracy(
    built: BuiltModel,
    images: Sequence,
    labels: Sequence[int],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str = "cpu",
) -> ZeroShotResult:
    weights = zero_shot_classifier(built, classnames, templates, device)
    return classification_accuracy(encode_images(built, images, device=device) @ weights, labels)


def classification_accuracy(logits: torch.Tensor, labels: Sequence[int]) -> ZeroShotResult:
    """Top-1 / top-5 accuracy of class scores [N, C] against labels (shared by zero-shot and the probes)."""
    y = torch.as_tensor(np.asarray(labels))
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (topk[:, 0] == y).float().mean().item()
    top5 = (topk == y[:, None]).any(dim=1).float().mean().item()
    return ZeroShotResult(top1=top1, top5=top5, n=len(y))


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    groups: Sequence[int] | None = None,
) -> dict[str, float]:
    """Recall@k for pairs (image i, text i): image->text and text->image.

    `groups` (one per pair): every item of the query's group counts as a match,
    as with COCO's five captions per image, or class-level retrieval where all
    captions of a class are interchangeable. Default: only the pair's partner.
    """
    n = len(image_emb)
    g = torch.as_tensor(np.asarray(groups)) if groups is not None else torch.arange(n)
    match = g[:, None] == g[None, :]
    sims = image_emb @ text_emb.T
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        # rank of the best match = number of non-matching candidates scoring strictly higher
        best = s.masked_fill(~match, float("-inf")).amax(dim=1, keepdim=True)
        rank = ((s > best) & ~match).sum(dim=1)
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


def read_pairs(shards: list[str], limit: int | None = None) -> tuple[list, list[str]]:
    """(PIL images, captions) from webdataset shards, in shard order; pairs whose image cannot be
    decoded (curation.core.imageio's limits) are left out, with a warning that counts them."""
    from curation.core.imageio import ImageRefused, open_image, to_rgb
    from train.data import IMAGE_KEYS, _raw_samples

    images, captions = [], []
    refused: dict[str, int] = {}
    for path in shards:
        for s in _raw_samples(path):
            key = next((k for k in IMAGE_KEYS if k in s), None)
            if key is None or "txt" not in s:
                continue
            try:
                images.append(to_rgb(open_image(s[key])))
            except ImageRefused as e:
                refused[e.status] = refused.get(e.status, 0) + 1
                continue
            captions.append(s["txt"].decode("utf-8", "replace"))
            if limit is not None and len(images) >= limit:
                break
        if limit is not None and len(images) >= limit:
            break
    if refused:
        log.warning(
            "retrieval: left out %d pairs whose image was refused: %s", sum(refused.values()), refused
        )
    return images, captions


def fashion_mnist_zero_shot(
    built: BuiltModel, source: str = "subset", device: str = "cpu", limit: int | None = None
) -> ZeroShotResult:
    from train import fashion_mnist

    images, labels = fashion_mnist.load("test", source)  # type: ignore[arg-type]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return zero_shot_accuracy(
        built, list(images), labels, fashion_mnist.CLASSES, fashion_mnist.TEMPLATES, device
    )


def read_image_folder(root: Path) -> tuple[list, list[int], list[str]]:
    """(PIL images, labels, class names) of ROOT/CLASS_NAME/*.jpg|png|webp; '_' in folder names reads as ' '.

    Images that cannot be decoded (curation.core.imageio's limits) are left out, with a warning that counts them.
    """
    from curation.core.folders import FileRefused, read_inside
    from curation.core.imageio import ImageRefused, open_image, to_rgb
    from curation.core.shards import DEFAULT_MAX_MEMBER_BYTES

    if not root.is_dir():
        raise FileNotFoundError(f"not 'fashion-mnist' and not a directory: {root}")
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not dirs:
        raise ValueError(f"{root} has no class sub-folders")
    images, labels = [], []
    refused: list[str] = []
    for label, d in enumerate(dirs):
        for f in sorted(d.iterdir()):
            if f.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}:
                try:
                    # inside ROOT, regular files, bounded: a FIFO or a link to /dev/zero never blocks
                    images.append(to_rgb(open_image(read_inside(f, root, DEFAULT_MAX_MEMBER_BYTES))))
                except (ImageRefused, FileRefused) as e:
                    refused.append(f"{f.name} ({e.status})")
                    continue
                labels.append(label)
    if refused:
        log.warning(
            "%s: left out %d images that were refused: %s", root, len(refused), ", ".join(refused[:5])
        )
    return images, labels, [d.name.replace("_", " ") for d in dirs]


ProgressFn = Callable[[str], None]
