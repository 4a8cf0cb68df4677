"""Webdataset shards -> batches, as a deterministic, endless, resumable stream.

The stream of a (rank, worker) pair is a pure function of (seed, rank, world size,
workers): epoch e reads the shards in a seeded permutation, each (rank, worker)
takes its share (whole shards when there are enough, else every n-th sample), a
seeded buffer shuffles, and each batch's augmentations use a seed derived from
its position. Resuming at step s therefore skips the first s batches *before*
decoding (raw tar bytes only) and yields exactly the batches an uninterrupted
run would have seen. The stream never ends, so all DDP ranks run the same number
of steps even when shards differ in size; `steps` or `epochs` in the config
decide the length.

Batches are built inside the workers (as open_clip does); the DataLoader takes
them round-robin from its workers, which is what makes the skip arithmetic exact.

A batch is a dict: `image` [B,3,H,W] and `text` [B,L] always; `uid` (the
samples' ids from their `.json`, None where absent) so features that need more
per-sample data (distillation targets, hard-pair partners) can add keys
without changing the loop's contract. With `concept_vocabulary_size=V` (distillation on),
`concept_ids` [B,k] int64 and `concept_probs` [B,k] float32 hold each sample's
`{key}.concepts.json` targets, padded to the batch's largest k with id -1 and
probability 0. `source` [B] int64 says which source of a mixture each sample came from.

Mixtures (`data.sources`). Each source is read by each (rank, worker) slot as
above (its own seeded shard order per epoch, its own partition between slots),
and the slot draws every sample's source with a seeded generator, source k with
probability weight_k / sum of weights: the weights are shares of *samples*, so
a source of few large shards gets its share, and a small source with a large
weight is read more often (several of its epochs per epoch of the others). The
draw happens before the shuffle buffer and before decoding, so resume skips it
as it skips everything else. One source (`data.shards`) is read exactly as
before mixtures existed: same order for the same seed.

`resampled: true` is open_clip's `--dataset-resampled`: each slot draws shards
with replacement, uniformly within a source, from its own seeded generator; no
epochs, and ranks do not partition the shards (two ranks may read the same
shard at the same time), which is what lets a mixture run for any number of
steps without an epoch boundary. The samples of one drawn shard are read in
order (then shuffled by the buffer). open_clip's upsampling factors weight each
*shard*; ours weight each source's share of samples.
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation.core.patterns import brace_expand, has_glob, missing_note
from curation.core.shards import CONCEPTS
from curation.core.storage import is_url, open_store

if TYPE_CHECKING:
    from train.config import DataConfig
    from train.trunk_cache import TrunkCache

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CONCEPTS_KEY = CONCEPTS  # the member `curate select` writes: {"ids": [...], "probs": [...]}

log = logging.getLogger(__name__)


_WARNED: set[str] = set()  # patterns whose missing shards were named already (once per process)


def expand_shards(pattern: str) -> list[str]:
    """Brace pattern (open_clip's syntax) and/or glob -> sorted list of existing tar paths.

    The pattern may be a URL (`s3://b/sel/{00000..00099}.tar`): each folder is listed
    once (not one request per shard), and the tars are later streamed from the store.
    Shards the pattern names but nobody wrote are left out with a warning that names them.
    """
    paths, missing = find_shards(pattern)
    if missing and pattern not in _WARNED:
        _WARNED.add(pattern)
        log.warning("%s: %s", pattern, missing_note(len(paths), missing))
    return paths


def find_shards(pattern: str) -> tuple[list[str], list[str]]:
    """(existing tar paths, sorted; names the pattern spells out that do not exist). Raises
    FileNotFoundError when nothing matches."""
    if is_url(pattern):
        return _expand_url_shards(pattern, brace_expand(pattern))
    paths: list[str] = []
    missing: list[str] = []
    for p in brace_expand(pattern):
        if has_glob(p):
            paths.extend(glob.glob(p))
        elif Path(p).exists():
            paths.append(p)
        else:
            missing.append(p)
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return sorted(set(paths)), missing


def _expand_url_shards(pattern: str, urls: list[str]) -> tuple[list[str], list[str]]:
    listed: dict[str, set[str]] = {}
    paths: list[str] = []
    missing: list[str] = []
    for url in urls:
        folder, _, name = url.rpartition("/")
        if folder not in listed:
            store = open_store(folder)
            names = set(store.list(""))
            listed[folder] = names
        if has_glob(name):
            paths.extend(f"{folder}/{n}" for n in sorted(listed[folder]) if fnmatch.fnmatchcase(n, name))
        elif name in listed[folder]:
            paths.append(url)
        else:
            missing.append(url)
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    return sorted(set(paths)), missing


def count_from_sizes(shards: list[str], sizes_path: str | None = None) -> int | None:
    """Total samples of `shards` from sizes.json (tar name -> count); None when there is no sizes file."""
    path = sizes_path or f"{shards[0].rpartition('/')[0] or '.'}/sizes.json"
    folder, _, name = path.rpartition("/")
    store = open_store(folder or ".")
    if not store.exists(name):
        if sizes_path:
            raise FileNotFoundError(f"sizes file not found: {sizes_path}")
        return None
    try:
        sizes = json.loads(store.get_bytes(name))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(sizes, dict):
        raise ValueError(
            f"{path}: expected an object of tar name -> sample count, got a {type(sizes).__name__}"
        )
    names = [s.rpartition("/")[2] for s in shards]
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"{path} has no entry for {len(missing)} shard(s), e.g. {missing[0]}")
    for tar in names:
        count = sizes[tar]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{path}: {tar}: expected a sample count (an integer >= 0), got {count!r}")
    return sum(sizes[n] for n in names)


@dataclass(frozen=True)
class DataSource:
    """One shard set of the training data and its mixture weight."""

    name: str  # the pattern the user wrote
    shards: tuple[str, ...]
    weight: float = 1.0
    sizes: str | None = None  # sizes.json of these shards; None = beside the first shard


def data_sources(data: DataConfig) -> list[DataSource]:
    """The config's shard sets (`data.shards`: one, weight 1; `data.sources`: each with its weight), expanded."""
    if data.sources is None:
        assert data.shards is not None
        return [DataSource(data.shards, tuple(expand_shards(data.shards)), 1.0, data.sizes)]
    sources = [
        DataSource(s.shards, tuple(expand_shards(s.shards)), float(s.weight), s.sizes) for s in data.sources
    ]
    seen: dict[str, str] = {}
    for src in sources:
        for path in src.shards:
            if path in seen:
                raise ValueError(f"shard {path} is in two data.sources ({seen[path]!r} and {src.name!r})")
            seen[path] = src.name
    return sources


def source_patterns(data: DataConfig) -> list[tuple[tuple, str, str | None]]:
    """(config key, pattern, sizes file) of each shard set: `data.shards`, or each of `data.sources`."""
    if data.sources is None:
        assert data.shards is not None
        return [(("data", "shards"), data.shards, data.sizes)]
    return [(("data", "sources", i, "shards"), s.shards, s.sizes) for i, s in enumerate(data.sources)]


def describe_sources(data: DataConfig) -> tuple[list[str], list[tuple[tuple, str]], list[tuple]]:
    """What `curate validate` says about a training config's data: one line per shard set (shards
    found, missing ones named, samples), the problems that would stop `curate train` (key, message),
    and the keys of the shard sets without sample counts."""
    lines: list[str] = []
    problems: list[tuple[tuple, str]] = []
    uncounted: list[tuple] = []
    for key, pattern, sizes in source_patterns(data):
        try:
            shards, missing = find_shards(pattern)
        except (FileNotFoundError, OSError) as e:
            problems.append((key, str(e)))
            continue
        found = missing_note(len(shards), missing) if missing else f"{len(shards)} shard(s)"
        try:
            counted = count_from_sizes(shards, sizes)
        except (FileNotFoundError, ValueError) as e:
            problems.append(((*key[:-1], "sizes"), str(e)))
            continue
        if counted is None:
            uncounted.append(key)
        samples = f"{counted:,} samples" if counted is not None else "sample count unknown (no sizes.json)"
        lines.append(f"{pattern}: {found}, {samples}")
    return lines, problems, uncounted


def all_shards(sources: Sequence[DataSource]) -> list[str]:
    return [path for src in sources for path in src.shards]


def count_source_samples(sources: Sequence[DataSource]) -> int | None:
    """Samples of all sources (an epoch); None when some source has no sizes file."""
    counts = [count_from_sizes(list(src.shards), src.sizes) for src in sources]
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)


def _raw_samples(path: str) -> Iterator[dict]:
    """webdataset-style samples ({"__key__", "__url__", extension: bytes}) of one tar, read through
    `curation.core.shards`: members over its size limit and repeated keys are left out, with a warning."""
    from curation.core.shards import read_samples

    for s in read_samples(path):
        if s.status is not None:
            log.warning("%s: left out sample %r: %s", path, s.key, s.detail)
            continue
        yield {"__key__": s.key, "__url__": path, **s.members}


class ShardStream(IterableDataset):
    """Endless stream of collated batches ({"image": [B,3,H,W], "text": [B,L], "uid": [B]}) for one rank."""

    def __init__(
        self,
        shards: Sequence[str] | Sequence[DataSource],
        batch_size: int,
        image_transform: Callable,
        tokenizer: Callable,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 2000,
        start_step: int = 0,
        concept_vocabulary_size: int | None = None,
        resampled: bool = False,
        views: int | None = None,
        trunk_cache: TrunkCache | None = None,
    ) -> None:
        super().__init__()
        # A list of tar paths is one source of weight 1.
        self.sources: list[DataSource] = (
            list(shards)  # type: ignore[arg-type]
            if shards and isinstance(shards[0], DataSource)
            else [DataSource("shards", tuple(shards), 1.0)]  # type: ignore[arg-type]
        )
        self.shards = all_shards(self.sources)
        self.resampled = resampled
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.start_step = start_step
        # Set when batches carry distillation targets (ids are checked against it); None = they do not.
        self.concept_vocabulary_size = concept_vocabulary_size
        # `data.views`: each sample shows one of this many fixed augmentations (None: a fresh one each
        # time); with `trunk_cache`, batches carry the locked trunk's features of them instead of pixels.
        if trunk_cache is not None and views != trunk_cache.views:
            raise ValueError(f"the trunk cache holds {trunk_cache.views} views per image, the stream {views}")
        self.views, self.trunk_cache = views, trunk_cache

    # -- raw (undecoded) samples of one slot -------------------------------------------------
    def _slot_samples(self, slot: int, slots: int) -> Iterator[dict]:
        """The slot's samples, each tagged with its source (`__source__`), mixed by the sources' weights."""
        streams = [self._tagged(k, self._source_samples(k, slot, slots)) for k in range(len(self.sources))]
        if len(streams) == 1:  # no draw at all: one source reads exactly as before mixtures existed
            yield from streams[0]
            return
        rng = random.Random(f"mix-{self.seed}-{slot}-{slots}")
        cum = list(itertools.accumulate(src.weight for src in self.sources))
        ks = range(len(streams))
        while True:
            yield next(streams[rng.choices(ks, cum_weights=cum)[0]])

    @staticmethod
    def _tagged(k: int, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["__source__"] = k
            yield sample

    def _source_samples(self, k: int, slot: int, slots: int) -> Iterator[dict]:
        src = self.sources[k]
        if self.resampled:
            yield from self._resampled(k, slot, slots)
            return
        for epoch in range(1 << 62):
            order = list(src.shards)
            # Source 0 keeps the seed string of the single-source stream, so `data.shards` runs are unchanged.
            tag = f"{self.seed}-{epoch}" if k == 0 else f"{self.seed}-{k}-{epoch}"
            random.Random(f"shards-{tag}").shuffle(order)
            found = False
            if len(order) >= slots:
                # Whole shards per slot: each tar is read by one reader only.
                for path in order[slot::slots]:
                    for sample in _raw_samples(path):
                        found = True
                        yield sample
            else:
                # Fewer shards than readers: every reader scans all, keeps every slots-th sample.
                i = 0
                for path in order:
                    for sample in _raw_samples(path):
                        if i % slots == slot:
                            found = True
                            yield sample
                        i += 1
            if not found:  # an endless stream of nothing would spin forever
                raise ValueError(f"data source {src.name!r}: its shards hold no sample for reader {slot}")

    def _resampled(self, k: int, slot: int, slots: int) -> Iterator[dict]:
        """Shards drawn with replacement (open_clip's ResampledShards2), seeded per (source, slot)."""
        src = self.sources[k]
        rng = random.Random(f"resample-{self.seed}-{k}-{slot}-{slots}")
        empty = 0
        while True:
            found = False
            for sample in _raw_samples(rng.choice(src.shards)):
                found = True
                yield sample
            empty = 0 if found else empty + 1
            if empty > 10 * len(src.shards):
                raise ValueError(f"data source {src.name!r}: {empty} shards drawn in a row hold no sample")

    def _shuffled(self, src: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from src
            return
        buf: list[dict] = []
        for sample in src:
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            j = rng.randrange(len(buf))
            buf[j], sample = sample, buf[j]
            yield sample
        # unreachable for the endless stream; kept for finite sources
        rng.shuffle(buf)
        yield from buf

    # -- decoding ---------------------------------------------------------------------------
    def _decode(self, sample: dict, view: int | None = None) -> torch.Tensor:
        """The image tensor of one raw sample (images decode through curation.core.imageio's limits):
        a fresh augmentation, or with `view` that fixed view (train/trunk_cache.py)."""
        from curation.core.imageio import ImageRefused, open_image, to_rgb
        from train.trunk_cache import augment_view, image_digest

        key = image_member(sample)
        try:
            if view is not None:
                return augment_view(self.image_transform, sample[key], image_digest(sample[key]), view)
            return self.image_transform(to_rgb(open_image(sample[key])))
        except ImageRefused as e:
            raise ValueError(f"cannot decode {sample['__key__']}.{key} in {sample['__url__']}: {e}") from e

    def _images(self, raw: list[dict], batch_seed: str) -> torch.Tensor:
        """The batch's image tensors, or with a trunk cache the locked trunk's features of them."""
        if self.views is not None:
            from train.trunk_cache import choose_views, image_digest

            views = choose_views(batch_seed, len(raw), self.views)
            if self.trunk_cache is not None:
                digests = [image_digest(s[image_member(s)]) for s in raw]
                return self.trunk_cache.lookup(digests, views)
            return torch.stack([self._decode(s, v) for s, v in zip(raw, views)])
        # Augmentation randomness is a function of the batch's position, so resume reproduces it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(batch_seed.encode(), "little") % (1 << 63))
            state = random.getstate()
            random.seed(batch_seed)
            try:
                return torch.stack([self._decode(s) for s in raw])
            finally:
                random.setstate(state)

    def _collate(self, raw: list[dict], batch_seed: str) -> dict[str, Any]:
        batch = {
            "image": self._images(raw, batch_seed),
            "text": self.tokenizer([caption(s) for s in raw]),
            "uid": [_uid(s) for s in raw],
            "source": torch.tensor([s.get("__source__", 0) for s in raw], dtype=torch.int64),
        }
        if self.concept_vocabulary_size is not None:
            batch["concept_ids"], batch["concept_probs"] = concept_targets(raw, self.concept_vocabulary_size)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes its b-th batch from worker b % nw. Global step s was made by worker
        # s % nw in an uninterrupted run, so after resuming at start_step worker `wid` plays role
        # v = (wid + start_step) % nw, and skips the steps < start_step that role had produced.
        v = (wid + self.start_step) % nw
        slot, slots = self.rank * nw + v, self.world_size * nw
        skip = max(0, -(-(self.start_step - v) // nw))
        rng = random.Random(f"buffer-{self.seed}-{slot}-{slots}")
        stream = self._shuffled(self._slot_samples(slot, slots), rng)
        local = 0
        while True:
            raw = [next(stream) for _ in range(self.batch_size)]
            if local >= skip:
                yield self._collate(raw, f"aug-{self.seed}-{slot}-{slots}-{local}")
            local += 1


def image_member(sample: dict) -> str:
    """The extension of a raw sample's image member; a sample without an image or caption is refused."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "txt" not in sample:
        raise ValueError(
            f"sample {sample.get('__key__')!r} in {sample.get('__url__')} lacks an image "
            f"({'/'.join(IMAGE_KEYS)}) or a .txt caption; found {sorted(k for k in sample if not k.startswith('__'))}"
        )
    return key


def shard_images(sources: Sequence[DataSource]) -> Iterator[tuple[str, bytes]]:
    """("KEY.EXT in SHARD", encoded image) of every sample of every source's shards, in order (what a
    trunk cache holds)."""
    for source in sources:
        for path in source.shards:
            for sample in _raw_samples(path):
                ext = image_member(sample)
                yield f"{sample['__key__']}.{ext} in {path}", sample[ext]


def caption(sample: dict) -> str:
    return sample["txt"].decode("utf-8")


def concept_targets(raw: list[dict], vocabulary_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([B,k] int64 ids padded with -1, [B,k] float32 probs padded with 0) from the samples' concepts.json."""
    rows = []
    for sample in raw:
        where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
        data = sample.get(CONCEPTS_KEY)
        if data is None:
            raise ValueError(
                f"{where} has no {CONCEPTS_KEY}: distillation needs shards selected from a run with a "
                "concepts stage (`curate select`), or remove the distill section"
            )
        try:
            targets = json.loads(data)
            ids, probs = [int(i) for i in targets["ids"]], [float(p) for p in targets["probs"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{where}: malformed {CONCEPTS_KEY}: {e}") from None
        if len(ids) != len(probs):
            raise ValueError(f"{where}: {CONCEPTS_KEY} has {len(ids)} ids but {len(probs)} probs")
        if ids and not (min(ids) >= 0 and max(ids) < vocabulary_size):
            raise ValueError(
                f"{where}: concept ids {min(ids)}..{max(ids)} fall outside the vocabulary of "
                f"{vocabulary_size} names (distill.vocabulary is not the one these targets index)"
            )
        rows.append((ids, probs))
    k = max(1, max(len(ids) for ids, _ in rows))
    # Padded in Python, converted once: one tensor per batch, not two per sample.
    ids_rows = [ids + [-1] * (k - len(ids)) for ids, _ in rows]
    probs_rows = [probs + [0.0] * (k - len(probs)) for _, probs in rows]
    return torch.tensor(ids_rows, dtype=torch.int64), torch.tensor(probs_rows, dtype=torch.float32)


def _uid(sample: dict) -> str | None:
    """The sample's manifest uid from its `.json` member (`curate select` writes it), else None."""
    raw = sample.get("json")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return str(uid) if uid is not None else None


class MixtureLog:
    """The samples each source actually delivered (the batches' `source` key), against the weights."""

    def __init__(self, sources: Sequence[DataSource]) -> None:
        self.sources = list(sources)
        self.counts = [0] * len(self.sources)

    def add(self, batch: dict[str, Any]) -> list[int]:
        """Count one batch; returns its samples per source."""
        step = torch.bincount(batch["source"], minlength=len(self.sources)).tolist()
        self.counts = [a + b for a, b in zip(self.counts, step)]
        return step

    def shares(self) -> list[float]:
        total = sum(self.counts)
        return [c / total if total else 0.0 for c in self.counts]

    def summary(self) -> str:
        wsum = sum(s.weight for s in self.sources)
        parts = [
            f"{src.name}: {n:,} samples, {share:.1%} (weight {src.weight / wsum:.1%})"
            for src, n, share in zip(self.sources, self.counts, self.shares())
        ]
        return "data mixture delivered: " + "; ".join(parts)


def make_loader(stream: ShardStream, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # batches come collated from the stream
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )


def check_shards(shards: list[str]) -> None:
    """Refuse, before any step, a shard that is not a tar: its first sample's headers are read by
    `curation.core.shards` (ShardError). A tar cut short further on fails where the reader reaches the cut."""
    import contextlib

    from curation.core.shards import read_samples

    for path in shards:
        with contextlib.closing(
            read_samples(path, read=lambda key, ext: False, max_member_bytes=2**63)
        ) as tar:
            next(tar, None)
