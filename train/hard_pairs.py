"""Hard-pair batches (HELIP, docs/methods.md §3b): half anchors, half one hard partner per anchor.

How partners are fetched. A partner is an arbitrary sample of the subset, so a
streaming read of the shards cannot supply it. `curate select` writes plain
(uncompressed) tars, so every member has a fixed byte offset: at start the
trainer scans the tars' headers and `.json` members once and keeps an index
uid -> (tar, member offsets), then reads each sample of a batch with one
positioned read per member. This was chosen over writing pair-ordered shards per
epoch (a `select --hard-pairs` pass) because it costs no extra disk or pass per
epoch, lets the draw of partners change every epoch, and makes any step's batch
computable directly (resume needs no skipping, and the order does not depend on
`data.workers`). Local shards are read with `os.pread`; shards on object storage
(`s3://...`) are scanned once at start (transient errors retried as everywhere
in the storage layer) and then read with one ranged GET per member (`Store.read_ranges`, a batch's reads concurrent); the hard-pair
table may be a URL as well. The index holds one small Python record per sample
(~200 bytes).

Batches. The epoch's anchors are a seeded permutation of the hard-pair table's
uids. Global step s of epoch e takes the next W·B/2 anchors (W ranks, B per
rank); rank r takes its contiguous B/2 of them, so ranks partition the anchors
and no anchor appears twice in an epoch (the last incomplete group of each epoch
is dropped). Each anchor's partner is drawn, with a generator seeded by
(seed, global step), from the first `top` uids of its hard list, skipping
partners already in the global batch (as anchor or partner) while its list
offers another. A rank's batch is its B/2 anchors followed by their partners,
in the same order, so sample i < B/2 and sample B/2 + i are a pair.

With a mixture (`data.sources`), the index covers every source's shards and the
epoch's anchor order is drawn by the weights: each position takes its source
with probability weight_k / sum of weights, then the next anchor of that
source's own seeded permutation (a fresh permutation when it runs out, so an
up-weighted source repeats anchors within an epoch), or with `resampled`, any
anchor of the source at random. The epoch keeps the table's number of anchors.
Partners are drawn from the whole data, whatever their source. One source
without `resampled` is the plain permutation above.

Extra batch key `partners`: bool [B, B], True at (i, j) when sample j is among
the first `top` hard pairs of sample i (j != i), the hard-partner sets H_i that
HardNegativeMarginLoss reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from curation.core.shards import META, ShardError, read_samples
from curation.core.storage import RETRY_SECONDS, Store, is_url, open_store, retrying, transient
from train.data import DataSource, ShardStream

if TYPE_CHECKING:
    from train.trunk_cache import TrunkCache

log = logging.getLogger("train")


@dataclass(frozen=True)
class SampleLocation:
    shard: int  # index into the index's shard list
    key: str
    members: tuple[tuple[str, int, int], ...]  # (extension, data offset, size)


class TarIndex:
    """uid -> where each member of that sample lies in the uncompressed tars."""

    def __init__(self, shards: list[str]) -> None:
        self.shards = list(shards)
        self.uids: list[str] = []
        self.locations: list[SampleLocation] = []
        self.position: dict[str, int] = {}
        for si, path in enumerate(self.shards):
            # A tar on object storage is scanned as the storage layer reads: transient errors retried.
            if is_url(path):
                found = retrying(lambda p=path: _scan(p), RETRY_SECONDS, f"scanning {path}")
            else:
                found = _scan(path)
            for key, uid, members in found:
                if uid in self.position:
                    raise ValueError(f"uid {uid} appears twice in the shards ({path}, key {key!r})")
                self.position[uid] = len(self.uids)
                self.uids.append(uid)
                self.locations.append(SampleLocation(si, key, members))

    def __len__(self) -> int:
        return len(self.uids)

    def read(self, i: int, files: dict[int, int]) -> dict[str, Any]:
        """Sample i (a local shard) as webdataset's raw dict ({"__key__", "__url__", ext: bytes});
        `files` caches fds."""
        loc = self.locations[i]
        fd = files.get(loc.shard)
        if fd is None:
            fd = files[loc.shard] = os.open(self.shards[loc.shard], os.O_RDONLY)
        sample: dict[str, Any] = {"__key__": loc.key, "__url__": self.shards[loc.shard]}
        for ext, offset, size in loc.members:
            sample[ext] = os.pread(fd, size, offset)
        return sample

    def read_many(
        self, ids: list[int], files: dict[int, int], stores: dict[str, Store]
    ) -> list[dict[str, Any]]:
        """Samples `ids` as `read` gives them; those in URL shards by ranged reads through the
        storage layer (one per member, all of them at once per folder). `stores` caches a store per folder."""
        samples: list[dict[str, Any] | None] = [None] * len(ids)
        wanted: dict[str, list[tuple[int, str, tuple[str, int, int]]]] = {}  # folder -> (slot, ext, range)
        for slot, i in enumerate(ids):
            loc = self.locations[i]
            url = self.shards[loc.shard]
            if not is_url(url):
                samples[slot] = self.read(i, files)
                continue
            samples[slot] = {"__key__": loc.key, "__url__": url}
            folder, _, name = url.rpartition("/")
            for ext, offset, size in loc.members:
                wanted.setdefault(folder, []).append((slot, ext, (name, offset, size)))
        for folder, reads in wanted.items():
            store = stores.get(folder)
            if store is None:
                store = stores[folder] = open_store(folder)
            for (slot, ext, _), data in zip(reads, store.read_ranges([r for _, _, r in reads])):
                samples[slot][ext] = data  # type: ignore[index]
        return samples  # type: ignore[return-value]


def _scan(path: str) -> list[tuple[str, str, tuple[tuple[str, int, int], ...]]]:
    """(key, uid, members as (extension, data offset, size)) of each sample of a plain tar, read through
    `curation.core.shards` (its name splitting; samples over its member size limit or with a repeated
    key are left out, with a warning); only the `.json` members are read."""
    out = []
    try:
        for s in read_samples(path, plain=True, read=lambda key, ext: ext == META):
            if s.status is not None:
                log.warning("%s: left out sample %r: %s", path, s.key, s.detail)
                continue
            meta = json.loads(s.members[META]) if META in s.members else None
            if not isinstance(meta, dict) or meta.get("uid") is None:
                raise ValueError(
                    f"{path}: sample {s.key!r} has no uid in its .json (curate select writes one)"
                )
            out.append((s.key, str(meta["uid"]), tuple((e, o, n) for e, (o, n) in s.offsets.items())))
    except ShardError as e:
        if e.__cause__ is not None and transient(e.__cause__):
            raise e.__cause__ from None  # retried by the caller
        raise ValueError(
            f"{e}; hard-pair training reads samples by offset from plain (uncompressed) tars"
        ) from None
    return out


class HardPairTable:
    """A `curate mine` table (uid, hard_uids) resolved against a TarIndex.

    `top[i]`: the first `top` hard partners of data sample i as data positions, -1 padded
    (all -1 for samples without a row); `anchors`: data positions of the table's uids.
    Refuses a table that does not match the data (HELIP's release never checks this).
    """

    def __init__(self, path: str | Path, index: TarIndex, top: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if is_url(str(path)):
            folder, _, name = str(path).rpartition("/")
            store = open_store(folder)
            if not store.exists(name):
                raise FileNotFoundError(f"hard_pairs.path: no such object: {path}")
            source: Any = pa.BufferReader(store.get_bytes(name))
        elif not Path(path).is_file():
            raise FileNotFoundError(f"hard_pairs.path: no such file: {path}")
        else:
            source = path
        table = pq.read_table(source, columns=["uid", "hard_uids"])
        uids = table.column("uid").to_pylist()
        lists = table.column("hard_uids").to_pylist()
        missing = [u for u in uids if u not in index.position]
        missing_partners = {h for hs in lists for h in (hs or [])[:top] if h not in index.position}
        if missing or missing_partners:
            example = (missing or sorted(missing_partners))[0]
            raise ValueError(
                f"hard-pair table {path} does not match the training shards: {len(missing):,} of its "
                f"{len(uids):,} anchor uids and {len(missing_partners):,} partner uids are not in the data "
                f"(e.g. {example}); mine the same shards you train on (`curate mine`)"
            )
        self.top = np.full((len(index), top), -1, dtype=np.int64)
        anchors = []
        for uid, hs in zip(uids, lists):
            i = index.position[uid]
            if hs:
                ids = [index.position[h] for h in hs[:top]]
                self.top[i, : len(ids)] = ids
            anchors.append(i)
        self.anchors = np.asarray(anchors, dtype=np.int64)
        if len(set(anchors)) != len(anchors):
            raise ValueError(f"hard-pair table {path} lists some uid twice")
        without = len(index) - len(anchors)
        if without:
            log.warning("%d training samples have no row in %s: they are never anchors", without, path)


class HardPairStream(ShardStream):
    """Endless batches of anchors + hard partners for one rank; batch s is a function of (seed, s)."""

    def __init__(
        self,
        shards: list[str] | list[DataSource],
        batch_size: int,
        image_transform,
        tokenizer,
        *,
        table_path: str | Path,
        top: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        concept_vocabulary_size: int | None = None,
        resampled: bool = False,
        views: int | None = None,
        trunk_cache: TrunkCache | None = None,
    ) -> None:
        super().__init__(
            shards, batch_size, image_transform, tokenizer,
            seed=seed, rank=rank, world_size=world_size, shuffle_buffer=1, start_step=start_step,
            concept_vocabulary_size=concept_vocabulary_size, resampled=resampled,
            views=views, trunk_cache=trunk_cache,
        )  # fmt: skip
        if batch_size % 2:
            raise ValueError(
                f"hard-pair batches are half anchors, half partners: batch_size must be even, got {batch_size}"
            )
        self.index = TarIndex(self.shards)
        self.table = HardPairTable(table_path, self.index, top)
        # Source of each shard (index order = the sources' shards in config order), then of each anchor.
        shard_source = np.repeat(np.arange(len(self.sources)), [len(src.shards) for src in self.sources])
        self.sample_source = shard_source[[loc.shard for loc in self.index.locations]]
        self.anchors_by_source = [
            self.table.anchors[self.sample_source[self.table.anchors] == k] for k in range(len(self.sources))
        ]
        empty = [src.name for src, a in zip(self.sources, self.anchors_by_source) if len(a) == 0]
        if empty and len(self.sources) > 1:
            raise ValueError(f"data source {empty[0]!r} has no anchor in the hard-pair table {table_path}")
        self.half = batch_size // 2
        self.global_half = self.half * world_size
        self.steps_per_epoch = len(self.table.anchors) // self.global_half
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.table.anchors)} anchors cannot fill one global batch of {self.global_half} anchors "
                f"(batch_size/2 x {world_size} ranks)"
            )
        self._order: tuple[int, np.ndarray] = (-1, self.table.anchors)  # (epoch, its anchor order), cached

    def epoch_order(self, epoch: int) -> np.ndarray:
        if len(self.sources) == 1 and not self.resampled:
            return np.random.default_rng([self.seed, epoch]).permutation(self.table.anchors)
        rng = np.random.default_rng([self.seed, epoch, 2])
        weights = np.array([src.weight for src in self.sources])
        picks = rng.choice(len(self.sources), size=len(self.table.anchors), p=weights / weights.sum())
        order = np.empty_like(self.table.anchors)
        for k, pool in enumerate(self.anchors_by_source):
            n = int((picks == k).sum())
            if n == 0:
                continue
            if self.resampled:
                order[picks == k] = rng.choice(pool, size=n)
            else:
                # Within the epoch a source's anchors come in seeded permutations, one after another: none
                # repeats before all of that source came once.
                reps = -(-n // len(pool))
                order[picks == k] = np.concatenate(
                    [np.random.default_rng([self.seed, epoch, k, c]).permutation(pool) for c in range(reps)]
                )[:n]
        return order

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(anchors, partners) of every rank at 0-based global `step`, as data positions [W·B/2] each."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, self.epoch_order(epoch))
        anchors = self._order[1][j * self.global_half : (j + 1) * self.global_half]
        rng = np.random.default_rng([self.seed, step, 1])
        starts = rng.random(len(anchors))
        taken = set(anchors.tolist())
        partners = np.empty_like(anchors)
        for p, a in enumerate(anchors):
            row = self.table.top[a]
            cands = row[row >= 0]
            if len(cands) == 0:  # no hard pair at all (a subset of one sample, or all near-duplicates)
                partners[p] = a
                continue
            first = int(starts[p] * len(cands))
            choice = cands[first]
            for t in range(len(cands)):
                c = int(cands[(first + t) % len(cands)])
                if c not in taken:
                    choice = c
                    break
            partners[p] = choice
            taken.add(int(choice))
        return anchors, partners

    def local_batch(self, step: int) -> np.ndarray:
        """This rank's samples (data positions) at global `step`: its anchors, then their partners."""
        anchors, partners = self.global_batch(step)
        sl = slice(self.rank * self.half, (self.rank + 1) * self.half)
        return np.concatenate([anchors[sl], partners[sl]])

    def partner_matrix(self, ids: np.ndarray) -> torch.Tensor:
        """[B, B] bool: True at (i, j) when sample j is among the first `top` hard pairs of sample i."""
        where: dict[int, list[int]] = {}
        for p, x in enumerate(ids.tolist()):
            where.setdefault(x, []).append(p)
        m = np.zeros((len(ids), len(ids)), dtype=bool)
        for i, row in enumerate(self.table.top[ids].tolist()):
            for t in row:
                for p in where.get(t, ()):
                    m[i, p] = p != i
        return torch.from_numpy(m)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        files: dict[int, int] = {}
        stores: dict[str, Store] = {}
        try:
            # The DataLoader takes batch b from worker b % nw: worker `wid` makes steps start+wid, start+wid+nw...
            for step in range(self.start_step + wid, 1 << 62, nw):
                ids = self.local_batch(step)
                raw = self.index.read_many(ids.tolist(), files, stores)
                for sample, i in zip(raw, ids.tolist()):
                    sample["__source__"] = int(self.sample_source[i])
                batch = self._collate(raw, f"aug-{self.seed}-{self.rank}-{self.world_size}-{step}")
                batch["partners"] = self.partner_matrix(ids)
                yield batch
        finally:
            for fd in files.values():
                os.close(fd)
