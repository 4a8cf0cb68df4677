"""`mine()`: embed the shards not embedded yet, then search all of them and write hard_pairs.parquet."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.core.outputs import exclusive_lock_on
from curation.models.encoders import (
    ClipTowers,
    ImageEncoder,
    SentenceTransformerText,
    TeacherImages,
    TextEncoder,
    text_model_fingerprint,
)
from train.mining.config import EncodersConfig, MineConfig
from train.mining.output import write_hard_pairs
from train.mining.store import MineDir, embed_shard, load_embeddings


def build_encoders(cfg: EncodersConfig) -> tuple[ImageEncoder, TextEncoder]:
    """(image encoder, text encoder): the checkpoint's towers, unless a separate model replaces one."""
    from curation.core.devices import resolve_device

    device = resolve_device(cfg.device)
    clip = None
    if cfg.image_teacher is None or cfg.text_model is None:
        assert cfg.checkpoint is not None
        clip = ClipTowers(cfg.checkpoint, cfg.model, device, cfg.batch_size)
    image: ImageEncoder = (
        TeacherImages(
            cfg.image_teacher,
            cfg.image_teacher_model,
            cfg.image_teacher_checkpoint,
            cfg.image_teacher_vocabulary,
            device,
            cfg.batch_size,
        )
        if cfg.image_teacher is not None
        else clip
    )
    text: TextEncoder = (
        SentenceTransformerText(cfg.text_model, device, cfg.batch_size)
        if cfg.text_model is not None
        else clip
    )
    return image, text


@dataclass
class MineResult:
    shards_embedded: int
    shards_reused: int
    pairs: int
    seconds_embedding: float
    seconds_mining: float
    output: str | Path  # hard_pairs.parquet: a local path, or a URL


def encoder_fingerprint(cfg: EncodersConfig) -> dict[str, Any]:
    """What the stored embeddings depend on, known without loading a model (weights by content)."""
    from curation.models.teachers import teacher_fingerprint

    clip = None
    if cfg.checkpoint is not None:
        clip = {"kind": "clip", "model": cfg.model, "sha256": _sha256(cfg.checkpoint)}
    image = clip
    if cfg.image_teacher is not None:
        image = {
            "kind": "teacher",
            **teacher_fingerprint(
                cfg.image_teacher,
                cfg.image_teacher_model,
                cfg.image_teacher_checkpoint,
                cfg.image_teacher_vocabulary,
            ),
        }
    text = clip if cfg.text_model is None else text_model_fingerprint(cfg.text_model)
    return {"image": image, "text": text}


def mine(cfg: MineConfig, *, say: Callable[[str], None] = lambda m: None) -> MineResult:
    """Embed the shards not embedded yet, then mine all of them and write hard_pairs.parquet.

    `say` gets one line per embedded shard (the CLI prints them), as `run_dedup`'s does."""
    from train.data import expand_shards

    shards = expand_shards(cfg.data.shards)
    by_name: dict[str, str] = {}
    for s in shards:
        other = by_name.setdefault(_name(s), s)
        if other != s:  # embeddings/<stem>.parquet and the ledger are named by the tar's file name
            raise ValueError(
                f"data.shards: {other} and {s} have the same file name; mine one folder at a time, or "
                "rename the tars (curate select numbers them 00000.tar, 00001.tar, ... per folder)"
            )
    mdir = MineDir(cfg.output)
    mdir.check()
    # One writer per output (local: flock; S3: a conditional-PUT lock object).
    with exclusive_lock_on(mdir.store, ".lock", f"another `curate mine` is writing to {mdir.url}"):
        fingerprint = encoder_fingerprint(cfg.encoders)
        mdir.prepare(fingerprint)
        todo = [s for s in shards if not mdir.is_done(s)]
        t0 = time.perf_counter()
        if todo:
            image_enc, text_enc = build_encoders(cfg.encoders)
            for i, shard in enumerate(todo):
                entry = embed_shard(mdir, shard, image_enc, text_enc, cfg.encoders.batch_size)
                refused = f", refused {entry['refused']}" if entry["refused"] else ""
                say(
                    f"embedded {entry['shard']}: {entry['rows']:,} pairs in {entry['seconds']:.1f}s "
                    f"({i + 1}/{len(todo)}){refused}"
                )
        t_embed = time.perf_counter() - t0
        uids, image, text = load_embeddings(mdir, shards)
        if not uids:
            raise ValueError(
                f"data.shards {cfg.data.shards!r}: the shards hold no image-caption pair to mine"
            )
        t1 = time.perf_counter()
        idx, scores = _search(cfg, image, text)
        t_mine = time.perf_counter() - t1
        params = {
            **dataclasses.asdict(cfg.mining),
            "encoders": fingerprint,
            "shards": [_name(s) for s in shards],
            "pairs": len(uids),
            "runner": cfg.runner.type,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_hard_pairs(mdir.hard_pairs, uids, idx, scores, params)
    return MineResult(len(todo), len(shards) - len(todo), len(uids), t_embed, t_mine, mdir.hard_pairs)


def _sha256(location: str) -> str:
    """sha256 of a local file or, streamed (never copied whole), of an object at a URL."""
    from curation.core.storage import is_url
    from curation.models.checkpoints import file_sha256

    if not is_url(location):
        return file_sha256(location)
    import hashlib

    import fsspec

    h = hashlib.sha256()
    with fsspec.open(location, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _name(shard: str) -> str:
    return shard.rstrip("/").rsplit("/", 1)[-1]


def _search(cfg: MineConfig, image, text):
    from train.mining.search import mine_hard_pairs, mine_hard_pairs_ray

    kwargs = dataclasses.asdict(cfg.mining)  # MiningConfig's keys are the searches' parameters
    if cfg.runner.type == "local":
        return mine_hard_pairs(image, text, device=cfg.encoders.device, **kwargs)
    import ray

    from curation.core.cluster import connect

    started_here = connect(cfg.runner.address)  # null address: a fresh local instance, never a running one
    try:
        return mine_hard_pairs_ray(
            image,
            text,
            queries_per_task=cfg.runner.queries_per_task,
            cpus_per_task=cfg.runner.cpus_per_task,
            gpus_per_task=cfg.runner.gpus_per_task,
            **kwargs,
        )
    finally:
        if started_here:
            ray.shutdown()
