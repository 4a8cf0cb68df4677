"""The training loop: one process per rank (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK), CPU or CUDA.

Resume is exact: model, optimiser, scheduler, GradScaler, RNG states and the step
are checkpointed, and the data stream (train/data.py) skips to the step without
decoding, so a resumed run repeats the loss curve of an uninterrupted one as
long as world size and data.workers are unchanged (otherwise the data order
differs; a warning says so).

A step's contrastive batch is `train.batch_size` per rank whatever the memory:
with `train.micro_batch` the step runs GradCache-style (Gao et al. 2021): the
embeddings of all micro-batches first, without autograd graphs but for the first
micro-batch's; the loss terms on the whole batch with those embeddings as leaf
tensors; then each micro-batch again with autograd (the first from its kept graph),
backpropagating the cached embedding gradients. The gradients are
those of the unsplit batch (test: float64, every loss), peak activation memory
that of one micro-batch. Unlike open_clip's `--accum-freq`, which recomputes the
whole loss once per micro-batch with the current one's features live (so the
logit scale's gradient is summed accum_freq times), the loss is computed once and
the logit scale's gradient enters once. The forward RNG state of each micro-batch
is replayed for its re-forward (dropout draws the same masks) and restored after
it, so the RNG stream after a step does not depend on the split.

With a `distill` section the trained module is `ConceptStudent` (the model plus
a linear concept head); the checkpoint keeps the model's state dict as it is and
stores the head beside it, so open_clip still loads the file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from curation.core.devices import resolve_device
from curation.core.storage import open_store
from curation.models.clip import build_model, embed_dim
from train.checkpoints import CheckpointDir, latest_checkpoint, list_checkpoints  # noqa: F401 (re-exported)
from train.config import TrainConfig
from train.data import (
    DataSource,
    MixtureLog,
    ShardStream,
    all_shards,
    count_source_samples,
    data_sources,
    make_loader,
    shard_images,
)
from train.hard_pairs import HardPairStream
from train.losses import ConceptDistillationLoss, HardNegativeMarginLoss, TrainingObjective, build_loss
from train.model import ConceptStudent, micro_batch_problem, param_groups
from train.trunk_cache import TrunkCache, trunk_bypassed

log = logging.getLogger("train")


# --------------------------------------------------------------------------- devices and ranks


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(spec: str, local_rank: int) -> torch.device:
    """The device rule of every command (`curation.core.devices`); a plain `cuda` is this rank's GPU."""
    device = resolve_device(spec)
    return torch.device(f"cuda:{local_rank}" if device == "cuda" else device)


def init_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; nccl for CUDA, gloo for CPU ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_spec, d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # As open_clip_train does: TF32 matmuls for fp32 on Ampere+ (~8% slower than fp16, near-fp32 accuracy).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return d, device


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA (what GPU users expect), fp32 on CPU (CPU bf16 matmuls are slow)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "amp":  # fp16 with loss scaling (GradScaler)
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- schedule


class WarmupCosine:
    """LR multiplier at step s: linear warm-up ((s+1)/warmup, as open_clip), then cosine to min_lr."""

    def __init__(
        self, base_lr: float, warmup: int, total: int, min_lr: float = 0.0, cosine: bool = True
    ) -> None:
        self.base_lr, self.warmup, self.total, self.min_lr, self.cosine = (
            base_lr,
            warmup,
            total,
            min_lr,
            cosine,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        lr = self.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.base_lr - self.min_lr)
        return lr / self.base_lr


# --------------------------------------------------------------------------- one step


# Outputs of the model that the loss terms read per sample: cached (and their gradients replayed)
# per micro-batch. The logit scale is one number for the whole batch.
_PER_SAMPLE_OUTPUTS = ("image_features", "text_features", "concept_logits")


def _forward_rng(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generator states a forward pass may draw from (dropout): CPU, and the device's on CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_forward_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward_backward(
    model: torch.nn.Module,
    objective: TrainingObjective,
    batch: dict[str, torch.Tensor],
    micro_batch: int | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward of one step on `batch` (already on the device); returns the detached loss terms.

    The gradients are accumulated into the parameters' `.grad`, scaled by `scaler` if given.
    `micro_batch` (dividing the batch) bounds activation memory without changing the gradients.
    `precision` is resolved already (fp32, bf16 or amp).
    """
    device = batch["image"].device
    scale = scaler.scale if scaler is not None else (lambda t: t)

    def amp() -> contextlib.AbstractContextManager:
        return autocast_for(precision, device)

    n = batch["image"].shape[0]
    if micro_batch is None or micro_batch >= n:
        with amp():
            terms = objective(model(batch["image"], batch["text"]), batch)
        scale(sum(terms.values())).backward()
        return {k: v.detach() for k, v in terms.items()}
    if n % micro_batch:
        raise ValueError(f"micro_batch {micro_batch} does not divide the batch of {n}")

    chunks = list(zip(batch["image"].split(micro_batch), batch["text"].split(micro_batch)))
    no_sync = getattr(model, "no_sync", None)  # DDP: all-reduce once, in the last backward

    def local_only() -> contextlib.AbstractContextManager:
        # Under DDP a forward inside no_sync makes its backward accumulate without the all-reduce.
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    # 1. Embeddings of every micro-batch. Only the first keeps its autograd graph (its backward
    # needs no re-forward); the others are computed without one and re-forwarded in 3.
    rng_before: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    outputs: list[dict[str, torch.Tensor]] = []
    for c, (images, texts) in enumerate(chunks):
        rng_before.append(_forward_rng(device))
        with local_only() if c == 0 else torch.no_grad(), amp():
            outputs.append(model(images, texts))
    kept: dict[str, torch.Tensor] | None = outputs[0]
    rng_after = _forward_rng(device)
    # 2. The loss on the whole batch, the embeddings as leaves: their gradients are the cache.
    leaves = {
        key: torch.cat([out[key].detach() for out in outputs]).requires_grad_()
        for key in _PER_SAMPLE_OUTPUTS
        if key in outputs[0]
    }
    scale_leaf = outputs[-1]["logit_scale"].detach().requires_grad_()
    del outputs
    with amp():
        terms = objective({**leaves, "logit_scale": scale_leaf}, batch)
    scale(sum(terms.values())).backward()
    cache = {key: leaf.grad.split(micro_batch) for key, leaf in leaves.items()}
    # 3. Each micro-batch's embeddings backpropagated with their cached gradients; all but the
    # first forwarded again with autograd, from the RNG state of their first forward.
    for c, (images, texts) in enumerate(chunks):
        last = c == len(chunks) - 1
        with contextlib.nullcontext() if last else local_only():
            if kept is not None:
                out, kept = kept, None
            else:
                _set_forward_rng(rng_before[c], device)
                with amp():
                    out = model(images, texts)
            surrogate = sum((out[key] * grads[c].to(out[key].dtype)).sum() for key, grads in cache.items())
            if last:  # the logit scale's gradient enters once; in the synced backward so DDP sees it used
                surrogate = surrogate + (out["logit_scale"] * scale_leaf.grad).sum()
            surrogate.backward()
            del out, surrogate
    _set_forward_rng(rng_after, device)
    return {k: v.detach() for k, v in terms.items()}


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- metrics


class MetricsWriter:
    """JSONL (one record per step) + optional TensorBoard; rank 0 only."""

    def __init__(self, output_dir: Path, resume_step: int) -> None:
        self.path = output_dir / "metrics.jsonl"
        if self.path.exists():
            # Drop records past the checkpoint we resume from (a crashed run may have logged them).
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln)["step"] <= resume_step
            ]
            open_store(output_dir).put_bytes(self.path.name, "".join(ln + "\n" for ln in keep).encode())
        self.file = self.path.open("a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run's first step purges what a crashed run logged past its checkpoint.
            self.tb = SummaryWriter(
                str(output_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        except ImportError:  # tensorboard not installed: JSONL only
            pass

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # complete up to each checkpoint, which uploads it when output_dir is a URL
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def flush(self) -> None:
        """Everything logged so far on disk: each checkpoint uploads these files when output_dir is a URL."""
        self.file.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS; Linux reports KiB


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    samples_per_s: float
    checkpoint: str | Path | None  # a URL when output_dir is one
    output_dir: Path


def total_steps(cfg: TrainConfig, world_size: int, num_samples: int | None) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    if num_samples is None:
        raise ValueError(
            "train.epochs needs sample counts: put sizes.json beside the shards or set data.sizes"
        )
    assert cfg.train.epochs is not None
    return max(1, math.ceil(cfg.train.epochs * num_samples / (cfg.train.batch_size * world_size)))


def distill_vocabulary(cfg: TrainConfig, shards: list[str]) -> list[str]:
    """The concept vocabulary: distill.vocabulary, else vocabulary.txt beside the first shard."""
    from curation.models.vocabulary import VocabularyError, read_vocabulary

    assert cfg.distill is not None
    from curation.core.storage import is_url

    if cfg.distill.vocabulary:
        path: str = str(cfg.distill.vocabulary)
    elif is_url(shards[0]):
        path = shards[0].rsplit("/", 1)[0] + "/vocabulary.txt"
    else:
        path = str(Path(shards[0]).parent / "vocabulary.txt")
    found = (
        open_store(path.rsplit("/", 1)[0]).exists(path.rsplit("/", 1)[1])
        if is_url(path)
        else Path(path).is_file()
    )
    if not found:
        raise FileNotFoundError(
            f"distillation needs the concept vocabulary: {path} not found (`curate select` writes it beside "
            "the shards of a run with a concepts stage; or set distill.vocabulary)"
        )
    try:
        return read_vocabulary(path)
    except VocabularyError as e:
        raise ValueError(str(e)) from None


def _restore_concept_head(ck: dict[str, Any], student: ConceptStudent | None, path: Path) -> None:
    """Resume restores the head with the model; a checkpoint and a config that disagree are refused."""
    if student is None:
        if "concept_head" in ck:
            raise ValueError(
                f"{path} was trained with concept distillation: keep the distill section to resume"
            )
        return
    if "concept_head" not in ck:
        raise ValueError(
            f"{path} was trained without concept distillation: remove the distill section to resume"
        )
    try:
        student.head.load_state_dict(ck["concept_head"])
    except RuntimeError:
        raise ValueError(
            f"{path}: its concept head has {ck['concept_head']['weight'].shape[0]} outputs, the vocabulary "
            f"{student.head.out_features}"
        ) from None


def train(cfg: TrainConfig, resume: bool = False) -> TrainResult:
    dist, device = init_distributed(cfg.train.device)
    try:
        return _train(cfg, resume, dist, device)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class Run:
    """What a run holds from its start to its last step (open_clip builds it in `main`)."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    ckpts: CheckpointDir
    built: Any  # curation.models.clip.BuiltModel
    student: ConceptStudent | None
    vocabulary: list[str] | None
    sources: list[DataSource]
    hard_stream: HardPairStream | None
    n_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    precision: str
    start_step: int = 0
    rng_state: dict[str, Any] | None = None
    trunk_cache: TrunkCache | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.built.model

    @property
    def net(self) -> torch.nn.Module:
        """What the optimizer trains: the model, or the model with its concept head."""
        return self.student if self.student is not None else self.model


def build_run(cfg: TrainConfig, dist: Dist, device: torch.device) -> Run:
    """The model, data sources, step count and optimiser of a run, as at step 0.

    Nothing is written to output_dir until everything that can fail at the start has worked
    (model, shards, step count, checkpoint, first batch): a failed start leaves no folder behind.
    """
    r = cfg.train
    ckpts = CheckpointDir(cfg.output_dir)  # output_dir may be a URL (s3://...)
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    torch.manual_seed(r.seed)
    random.seed(r.seed)
    m = cfg.model
    built = build_model(m.name, m.pretrained, device=device, image_init=m.image_init, lock_image=m.lock_image)
    if r.grad_checkpointing:
        built.model.set_grad_checkpointing(True)

    sources = data_sources(cfg.data)
    num_samples = count_source_samples(sources)
    # Read before any stream is built: a missing vocabulary fails the start.
    vocabulary = distill_vocabulary(cfg, all_shards(sources)) if cfg.distilling else None
    hard_stream = None
    if cfg.hard_pairs is not None:
        # Built (and the table checked against the data) before anything else is: a mismatch fails fast.
        hard_stream = HardPairStream(
            sources,
            r.batch_size,
            built.preprocess_train,
            built.tokenizer,
            table_path=cfg.hard_pairs.path,
            top=cfg.hard_pairs.top,
            seed=r.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            concept_vocabulary_size=len(vocabulary) if vocabulary is not None else None,
            resampled=cfg.data.resampled,
            views=cfg.data.views,
        )
    trunk_cache = None
    if cfg.data.trunk_cache is not None:
        assert cfg.data.views is not None  # train.config's rule
        trunk_cache = TrunkCache.open(
            cfg.data.trunk_cache,
            shard_images(sources),
            built.model.visual.trunk,
            built.preprocess_train,
            cfg.data.views,
            device,
        )
        if hard_stream is not None:
            hard_stream.trunk_cache = trunk_cache
    n_steps = total_steps(cfg, dist.world_size, num_samples)

    # Concept distillation: the head is created after the model, so the model's initial weights
    # (same seed) are those of a run without distillation.
    student = None
    if vocabulary is not None:
        student = ConceptStudent(built.model, embed_dim(built), len(vocabulary)).to(device)
    net: torch.nn.Module = student if student is not None else built.model

    o = cfg.optim
    optimizer = torch.optim.AdamW(
        param_groups(net, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    schedule = WarmupCosine(o.lr, o.warmup_steps, n_steps, o.min_lr, cosine=o.schedule == "cosine")
    precision = resolve_precision(r.precision, device)
    return Run(
        cfg,
        dist,
        device,
        ckpts,
        built,
        student,
        vocabulary,
        sources,
        hard_stream,
        n_steps,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        torch.amp.GradScaler(device.type, enabled=precision == "amp"),
        precision,
        trunk_cache=trunk_cache,
    )


def resume_run(run: Run) -> None:
    """Load the newest checkpoint into `run`: weights, optimiser, scheduler, scaler, step and RNG state."""
    path = run.ckpts.latest()
    if path is None:
        if run.dist.is_main:
            log.warning("--resume: no checkpoint in %s/checkpoints, starting from scratch", run.ckpts.url)
        return
    ck = run.ckpts.load(path)
    run.model.load_state_dict(ck["state_dict"])
    _restore_concept_head(ck, run.student, path)
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    run.scaler.load_state_dict(ck["scaler"])
    run.start_step, run.rng_state = int(ck["step"]), ck["rng"]
    # Hard-pair batches are a function of (seed, step, world size) alone; the stream's order also
    # depends on how many workers split it.
    same = ck.get("world_size") == run.dist.world_size and (
        run.cfg.hard_pairs is not None or ck.get("workers") == run.cfg.data.workers
    )
    if run.dist.is_main:
        log.info("resumed from %s at step %d", path, run.start_step)
        if not same:
            log.warning("world size or data.workers changed since the checkpoint: the data order will differ")


def train_step(
    run: Run, train_model: torch.nn.Module, objective: TrainingObjective, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One update on `batch` (on the device): forward, backward, clipping, optimiser and scheduler
    steps, CLIP's clamp of the temperature. Returns the detached loss terms."""
    r, o = run.cfg.train, run.cfg.optim
    # With a trunk cache the batch's "image" is the locked trunk's output: the step runs the rest.
    with trunk_bypassed(run.model) if run.trunk_cache is not None else contextlib.nullcontext():
        terms = forward_backward(train_model, objective, batch, r.micro_batch, run.precision, run.scaler)
    if o.grad_clip_norm is not None:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), o.grad_clip_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    with torch.no_grad():  # CLIP's clamp: temperature no lower than 1/100
        run.model.logit_scale.clamp_(0, math.log(100))
    return terms


def checkpoint_payload(run: Run, step: int) -> dict[str, Any]:
    """What a checkpoint holds: enough for an exact resume, and a state dict open_clip loads as is."""
    return {
        "step": step,
        "model_name": run.built.name,
        "state_dict": run.model.state_dict(),  # unwrapped: loads in open_clip as is
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": _rng_state(),
        "world_size": run.dist.world_size,
        "workers": run.cfg.data.workers,
        "config": run.cfg.to_dict(),
        # Beside the model, never inside state_dict: the file still loads in open_clip.
        **(
            {"concept_head": run.student.head.state_dict(), "concept_vocabulary": run.vocabulary}
            if run.student is not None
            else {}
        ),
    }


def _batches(run: Run) -> Iterator[dict[str, Any]]:
    """The run's batches from its start step; the first drawn now, so a shard that cannot be read
    fails the start, before anything is written."""
    r, dist = run.cfg.train, run.dist
    vocabulary_size = len(run.vocabulary) if run.vocabulary is not None else None
    stream: ShardStream
    if run.hard_stream is not None:
        run.hard_stream.start_step = run.start_step  # known only now that the checkpoint is loaded
        stream = run.hard_stream
    else:
        stream = ShardStream(
            run.sources,
            r.batch_size,
            run.built.preprocess_train,
            run.built.tokenizer,
            seed=r.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            shuffle_buffer=run.cfg.data.shuffle_buffer,
            start_step=run.start_step,
            concept_vocabulary_size=vocabulary_size,
            resampled=run.cfg.data.resampled,
            views=run.cfg.data.views,
            trunk_cache=run.trunk_cache,
        )
    batches: Iterator[dict[str, Any]] = iter(
        make_loader(stream, run.cfg.data.workers, pin_memory=run.device.type == "cuda")
    )
    # Creating the loader iterator draws from the RNG; restore afterwards so resume matches exactly.
    if run.rng_state is not None:
        _set_rng_state(run.rng_state)
    if run.start_step < run.n_steps:  # nothing between here and the loop uses the RNG
        batches = itertools.chain([next(batches)], batches)
    return batches


def _log_start(run: Run) -> None:
    r, o, dist = run.cfg.train, run.cfg.optim, run.dist
    log.info(
        "device %s, world size %d, precision %s, compile %s, grad_checkpointing %s, grad_clip_norm %s, "
        "contrastive batch %d (%d per rank, micro-batch %s), local loss %s, %d steps",
        run.device,
        dist.world_size,
        run.precision,
        r.compile,
        r.grad_checkpointing,
        o.grad_clip_norm,
        r.batch_size * dist.world_size,
        r.batch_size,
        r.micro_batch or "off",
        "on" if dist.world_size > 1 else "n/a (1 rank)",
        run.n_steps,
    )
    if o.warmup_steps >= run.n_steps:
        log.warning(
            "optim.warmup_steps (%d) >= the run's %d steps: the run ends inside warm-up, at %.3g x "
            "optim.lr, and the learning rate never decays",
            o.warmup_steps,
            run.n_steps,
            run.n_steps / max(1, o.warmup_steps),
        )


class StepLog:
    """Loss terms of the steps since the last flush, written as metrics (rank 0) one window at a time:
    one host sync per window, not per step; samples/s is the window's average."""

    def __init__(self, run: Run, metrics: MetricsWriter | None, bar: Any, log_lines: bool = False) -> None:
        self.run, self.metrics, self.bar, self.log_lines = run, metrics, bar, log_lines
        self.global_batch = run.cfg.train.batch_size * run.dist.world_size
        # (step, loss terms, lr, logit scale, samples per mixture source)
        self.pending: list[tuple[int, dict[str, torch.Tensor], float, torch.Tensor, dict[str, int]]] = []
        self.window_start = time.perf_counter()
        self.last_loss = float("nan")
        self.total_time, self.timed_steps = 0.0, 0

    def add(
        self,
        step: int,
        terms: dict[str, torch.Tensor],
        lr: float,
        scale: torch.Tensor,
        sources: dict[str, int],
    ) -> None:
        self.pending.append((step, terms, lr, scale, sources))

    def flush(self) -> None:
        if not self.pending:
            return
        run, pending = self.run, self.pending
        elapsed = time.perf_counter() - self.window_start
        self.total_time, self.timed_steps = self.total_time + elapsed, self.timed_steps + len(pending)
        sps = self.global_batch * len(pending) / elapsed
        mem = _memory_gb(run.device)
        names = list(pending[0][1])
        terms = torch.stack([torch.stack([t[k].float() for k in names]) for _, t, _, _, _ in pending])
        if run.dist.world_size > 1:
            # Each rank's terms cover its own samples (local loss, distillation): the run's loss is their mean.
            torch.distributed.all_reduce(terms)
            terms /= run.dist.world_size
        for (step, _, lr, scale, sources), values in zip(pending, terms.tolist()):
            self.last_loss = sum(values)
            rec = {
                "step": step,
                "loss": self.last_loss,
                "lr": lr,
                "logit_scale": float(scale),
                "samples_per_s": sps,
                "mem_gb": mem,
                **(dict(zip(names, values)) if len(names) > 1 else {}),
                **sources,
            }
            if self.metrics is not None:
                self.metrics.write(rec)
        if self.metrics is not None:
            self.metrics.flush()
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{self.last_loss:.4f}", lr=f"{pending[-1][2]:.2e}", sps=f"{sps:.0f}", refresh=False
            )
            self.bar.update(len(pending))
        if self.log_lines:
            log.info(
                "step %d/%d, loss %.4f, %s samples/s",
                pending[-1][0],
                run.n_steps,
                self.last_loss,
                f"{sps:.0f}",
            )
        pending.clear()
        self.window_start = time.perf_counter()

    @property
    def samples_per_s(self) -> float:
        return self.global_batch * self.timed_steps / self.total_time if self.total_time > 0 else float("nan")


def _train(cfg: TrainConfig, resume: bool, dist: Dist, device: torch.device) -> TrainResult:
    r = cfg.train
    run = build_run(cfg, dist, device)
    if problem := micro_batch_problem(run.net, r.micro_batch, r.batch_size):
        raise ValueError(f"train.micro_batch: {problem}")
    if resume:
        resume_run(run)
    train_model: torch.nn.Module = run.net
    if dist.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=ids)
    if r.compile:
        train_model = torch.compile(train_model)
    # Local loss is exact (train/losses.py), so it is always on: memory per rank linear in the global batch.
    objective = TrainingObjective(
        build_loss(cfg.loss.name, cfg.loss.alpha, cfg.loss.beta, local_loss=True),
        margin=HardNegativeMarginLoss(cfg.loss.hnml) if cfg.loss.hnml else None,
        distill=ConceptDistillationLoss(cfg.distill.loss)
        if run.student is not None and cfg.distill
        else None,
        distill_weight=cfg.distill.weight if cfg.distill else 0.0,
    )
    mixture = MixtureLog(run.sources) if len(run.sources) > 1 else None  # samples per source, per step
    batches = _batches(run)

    out_dir = run.ckpts.work_dir  # metrics and TensorBoard: output_dir, or a local folder for a URL
    if dist.is_main:
        open_store(out_dir).put_json("config.json", cfg.to_dict())
    metrics = MetricsWriter(out_dir, run.start_step) if dist.is_main else None
    bar = None
    # Into a log (stderr not a terminal), a line per log window instead of tqdm's `\r` frames.
    log_lines = dist.is_main and r.progress and not sys.stderr.isatty()
    if dist.is_main and r.progress and not log_lines:
        from tqdm import tqdm

        bar = tqdm(total=run.n_steps, initial=run.start_step, desc="train", unit="step", dynamic_ncols=True)
    if dist.is_main:
        _log_start(run)
    steps = StepLog(run, metrics, bar, log_lines)
    checkpoint = None
    run.model.train()
    for step in range(run.start_step + 1, run.n_steps + 1):  # 1-based: "step N" = N updates done
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items() if torch.is_tensor(v)}
        lr = run.optimizer.param_groups[0]["lr"]
        terms = train_step(run, train_model, objective, batch)
        # samples per source in this step's batch (data.sources), for its metrics record
        sources = {f"source_{k}_samples": n for k, n in enumerate(mixture.add(batch))} if mixture else {}
        steps.add(step, terms, lr, run.model.logit_scale.detach().exp(), sources)
        if r.log_every == 0 or step % r.log_every == 0 or step == run.n_steps:
            steps.flush()
        if step == run.n_steps or (r.checkpoint_every and step % r.checkpoint_every == 0):
            steps.flush()
            if dist.is_main:
                checkpoint = run.ckpts.save(step, checkpoint_payload(run, step))
                if r.keep_checkpoints:
                    run.ckpts.prune(r.keep_checkpoints)
            if dist.world_size > 1:
                torch.distributed.barrier()

    steps.flush()
    if bar is not None:
        bar.close()
    if mixture is not None and dist.is_main:
        log.info("%s (rank 0's batches, this process)", mixture.summary())
    if metrics is not None:
        metrics.close()
        run.ckpts.sync()  # a URL output_dir: the final metrics and TensorBoard files, not only a temp folder
    return TrainResult(
        steps=run.n_steps,
        final_loss=steps.last_loss,
        samples_per_s=steps.samples_per_s,
        checkpoint=checkpoint if checkpoint is not None else run.ckpts.latest(),
        output_dir=out_dir,
    )
