"""Fixed augmented views per sample, and a locked image trunk's features of them, computed once.

With a locked image trunk (LiT, `model.lock_image`), the trunk's output for a given image tensor
never changes during training: only its projection and the text tower learn. A run whose samples
draw their augmentation from `data.views` fixed views (each view seeded by the image's bytes and
the view's number, never by the run) can therefore run the trunk once per view and reuse the
result at every step, every epoch and in every run over the same images (`data.trunk_cache: FILE`).

Both paths are the same function of the data. With `data.views` and no cache, each batch decodes
and augments the views it drew and the trunk runs in the step; with the cache, the batch carries
the trunk's outputs and the step bypasses the trunk (`trunk_bypassed`). Tests train both ways and
compare losses and weights (equal up to float summation order: the trunk sees other batch shapes).

The cache file is content-addressed: its keys are the SHA-256 of each sample's image bytes, so one
file serves every subset of the images it holds (several `curate select` subsets of one run).
Images it lacks are computed and added on first use, under a lock, and the file is replaced
atomically. It records what its features depend on (the trunk's weights, the training transform,
the number of views); a cache made for anything else is refused, never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = "curate-trunk-cache-1"
# Bound on the features held in memory (N images x views x width x 4 bytes): beyond it the cache is
# the wrong tool (it is for runs that see few images many times, on machines where the trunk is the cost).
MAX_BYTES = 8 * 2**30


class TrunkCacheError(ValueError):
    """The cache file cannot serve this run (made for another trunk, transform or view count; damaged)."""


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def augment_view(transform: Callable, image_bytes: bytes, digest: str, view: int) -> torch.Tensor:
    """View `view` of an image: the training transform under a seed of (image bytes, view) alone."""
    from curation.core.imageio import open_image, to_rgb

    seed = f"view-{digest}-{view}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:15], 16))
        state = random.getstate()
        random.seed(seed)
        try:
            return transform(to_rgb(open_image(image_bytes)))
        finally:
            random.setstate(state)


def choose_views(batch_seed: str, n: int, views: int) -> list[int]:
    """The view each of a batch's n samples shows: a function of the batch's position, so resume repeats it."""
    rng = random.Random(f"{batch_seed}-views")
    return [rng.randrange(views) for _ in range(n)]


def _fingerprint(trunk: torch.nn.Module, transform: Callable, views: int) -> dict[str, Any]:
    h = hashlib.sha256()
    for name, tensor in trunk.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"format": FORMAT, "trunk": h.hexdigest(), "transform": repr(transform), "views": views}


@contextlib.contextmanager
def trunk_bypassed(model: torch.nn.Module) -> Iterator[None]:
    """The image tower takes the trunk's outputs as its input: `model(features, text)` runs only the
    projection onto the joint space (open_clip's TimmModel: trunk, then head)."""
    visual = model.visual
    trunk = visual.trunk
    visual.trunk = torch.nn.Identity()
    try:
        yield
    finally:
        visual.trunk = trunk


class TrunkCache:
    """The trunk's features of every view of a set of images, looked up by image digest."""

    def __init__(self, meta: dict[str, Any], keys: list[str], features: torch.Tensor) -> None:
        self.meta = meta
        self.keys = keys
        self.features = features  # [N, views, width] float32, on the CPU
        self.row = {k: i for i, k in enumerate(keys)}

    @property
    def views(self) -> int:
        return int(self.meta["views"])

    def lookup(self, digests: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        try:
            rows = [self.row[d] for d in digests]
        except KeyError as e:
            raise TrunkCacheError(f"image {e.args[0][:12]}... is not in the trunk cache") from None
        return self.features[torch.tensor(rows), torch.tensor(list(views))]

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        images: Iterable[tuple[str, bytes]],
        trunk: torch.nn.Module,
        transform: Callable,
        views: int,
        device: torch.device,
        batch_size: int = 256,
    ) -> TrunkCache:
        """The cache at `path` holding every one of `images` ((where it is, encoded image file) pairs,
        e.g. a run's shard members: `train.data.shard_images`): read, extended with the images it lacks (the trunk runs
        on `device`), written back atomically. One process at a time (a lock
        beside the file), so parallel runs share the work instead of repeating it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = _fingerprint(trunk, transform, views)
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cache = cls._read(path, meta) if path.exists() else cls(meta, [], torch.zeros(0, views, 0))
            added = cache._extend(images, trunk, transform, device, batch_size)
            if added:
                cache._write(path)
                log.info("trunk cache %s: %d images added, %d in all", path, added, len(cache.keys))
        return cache

    @classmethod
    def _read(cls, path: Path, meta: dict[str, Any]) -> TrunkCache:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            found, keys, features = saved["meta"], list(saved["keys"]), saved["features"]
        except Exception as e:  # a damaged file of any kind is one refusal
            raise TrunkCacheError(f"{path}: not a readable trunk cache ({type(e).__name__}: {e})") from None
        differ = [k for k in ("format", "trunk", "transform", "views") if found.get(k) != meta[k]]
        if differ:
            raise TrunkCacheError(
                f"{path} was made for another {' and '.join(differ)}: its features would be wrong for this "
                "run; delete it or set data.trunk_cache to another file"
            )
        if features.ndim != 3 or features.shape[:2] != (len(keys), meta["views"]):
            raise TrunkCacheError(f"{path}: features of shape {tuple(features.shape)} for {len(keys)} images")
        return cls(meta, keys, features.float())

    def _write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"meta": self.meta, "keys": self.keys, "features": self.features}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _extend(
        self,
        images: Iterable[tuple[str, bytes]],
        trunk: torch.nn.Module,
        transform: Callable,
        device: torch.device,
        batch_size: int,
    ) -> int:
        from curation.core.imageio import ImageRefused

        missing: dict[str, tuple[str, bytes]] = {}
        for where, data in images:
            digest = image_digest(data)
            if digest not in self.row and digest not in missing:
                missing[digest] = (where, data)
        if not missing:
            return 0
        views = self.views
        was_training = trunk.training
        trunk.eval()
        chunks: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []

        def flush() -> None:
            with torch.no_grad():
                chunks.append(trunk(torch.stack(pending).to(device)).float().cpu())
            pending.clear()

        for digest, (where, data) in missing.items():
            for v in range(views):
                try:
                    pending.append(augment_view(transform, data, digest, v))
                except ImageRefused as e:
                    raise TrunkCacheError(f"cannot decode {where}: {e}") from None
                if len(pending) >= batch_size:
                    flush()
        if pending:
            flush()
        trunk.train(was_training)
        new = torch.cat(chunks).reshape(len(missing), views, -1)
        if self.keys and new.shape[2] != self.features.shape[2]:
            raise TrunkCacheError(
                f"trunk width {new.shape[2]} differs from the cache's {self.features.shape[2]}"
            )
        total = (len(self.keys) + len(missing)) * views * new.shape[2] * 4
        if total > MAX_BYTES:
            raise TrunkCacheError(
                f"the trunk cache would hold {total / 2**30:.1f} GiB of features (bound {MAX_BYTES / 2**30:.0f} "
                "GiB): it is meant for few images seen many times; set data.trunk_cache: null"
            )
        self.features = new if not self.keys else torch.cat([self.features, new])
        for digest in missing:
            self.row[digest] = len(self.keys)
            self.keys.append(digest)
        return len(missing)
