"""Data mixtures (`data.sources` with weights, `data.resampled`): the delivered shares match the weights,
the stream is a function of the seed and resumes exactly, ranks partition, hard-pair batches mix too."""

from __future__ import annotations

import json
import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from train.config import ConfigError, load_train_config, parse_train_config
from train.data import DataSource, MixtureLog, ShardStream, data_sources, expand_shards, make_loader
from train.hard_pairs import HardPairStream, TarIndex
from train.loop import list_checkpoints, train


def _sources(shards: Path, weights: tuple[float, float] = (1.0, 3.0)) -> list[DataSource]:
    """Source a: 3 shards (384 samples), source b: 1 shard (128): b up-weighted against its size."""
    a, b = f"{shards}/{{00000..00002}}.tar", f"{shards}/00003.tar"
    return [
        DataSource(a, tuple(expand_shards(a)), weights[0]),
        DataSource(b, tuple(expand_shards(b)), weights[1]),
    ]


def _uids_of(path: str) -> set[str]:
    return set(TarIndex([path]).uids)


def _raw(stream: ShardStream, n: int, slot: int = 0, slots: int = 1) -> list[dict]:
    """The first n undecoded samples of one reader slot (no image decoding: fast enough for thousands)."""
    return list(islice(stream._slot_samples(slot, slots), n))


def _stream(sources, **kw) -> ShardStream:
    from curation.models.clip import build_model

    built = build_model("curate-tiny")
    return ShardStream(sources, kw.pop("batch_size", 8), built.preprocess_train, built.tokenizer, **kw)


@pytest.mark.parametrize("resampled", [False, True])
def test_delivered_shares_match_the_weights(fmnist_shards: Path, resampled: bool) -> None:
    sources = _sources(fmnist_shards)
    stream = ShardStream(sources, 8, lambda im: im, lambda t: t, resampled=resampled)
    raw = _raw(stream, 4000)
    share_b = sum(s["__source__"] for s in raw) / len(raw)
    # 3:1 by weight although b holds a quarter of the samples; binomial sd at n=4000 is 0.007.
    assert share_b == pytest.approx(0.75, abs=0.025)
    # Every sample's tag names the source whose shards it came from.
    b_uids = _uids_of(sources[1].shards[0])
    assert all((json.loads(s["json"])["uid"] in b_uids) == (s["__source__"] == 1) for s in raw)
    # The small source is read again and again (upsampled): each of its 128 samples several times.
    counts = Counter(json.loads(s["json"])["uid"] for s in raw if s["__source__"] == 1)
    assert len(counts) == 128 and min(counts.values()) >= (1 if resampled else 20)
    # Equal weights: equal shares, whatever the sizes.
    equal = ShardStream(
        _sources(fmnist_shards, (1.0, 1.0)), 8, lambda im: im, lambda t: t, resampled=resampled
    )
    assert sum(s["__source__"] for s in _raw(equal, 4000)) / 4000 == pytest.approx(0.5, abs=0.025)


def test_resampled_draws_shards_with_replacement_and_permutations_do_not(fmnist_shards: Path) -> None:
    one = [DataSource("all", tuple(expand_shards(f"{fmnist_shards}/*.tar")), 1.0)]

    def shard_runs(stream: ShardStream, slot: int = 0, slots: int = 1) -> list[str]:
        """The shards read, in order (each holds 128 samples and is read whole)."""
        return [s["__url__"] for s in _raw(stream, 128 * 24, slot, slots)[::128]]

    perm = shard_runs(ShardStream(one, 8, None, None))
    # Without replacement: every epoch (4 consecutive shards) reads each shard once.
    assert all(len(set(perm[i : i + 4])) == 4 for i in range(0, len(perm), 4))
    res = shard_runs(ShardStream(one, 8, None, None, resampled=True))
    assert any(len(set(res[i : i + 4])) < 4 for i in range(0, 24, 4))  # a shard again before the others
    assert set(res) == set(one[0].shards)
    # Deterministic per seed, different across seeds; two ranks may read the same shard (no partition).
    assert res == shard_runs(ShardStream(one, 8, None, None, resampled=True))
    assert res != shard_runs(ShardStream(one, 8, None, None, resampled=True, seed=1))
    rank1 = shard_runs(ShardStream(one, 8, None, None, resampled=True, rank=1, world_size=2), 1, 2)
    assert rank1 != res and set(rank1) & set(res)


def test_one_source_reads_as_the_plain_shard_list(fmnist_shards: Path) -> None:
    shards = expand_shards(f"{fmnist_shards}/*.tar")
    plain = [s["__key__"] for s in _raw(ShardStream(shards, 8, None, None), 700)]
    cfg = parse_train_config(
        f"data: {{shards: '{fmnist_shards}/*.tar'}}\noutput_dir: o\ntrain: {{steps: 1}}\n"
    )
    as_source = [s["__key__"] for s in _raw(ShardStream(data_sources(cfg.data), 8, None, None), 700)]
    assert plain == as_source


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_stream_resumes_exactly(fmnist_shards: Path, workers: int, resampled: bool) -> None:
    sources = _sources(fmnist_shards)

    def batches(start: int, n: int) -> list[dict]:
        it = iter(
            make_loader(_stream(sources, start_step=start, shuffle_buffer=32, resampled=resampled), workers)
        )
        return [next(it) for _ in range(n)]

    full = batches(0, 6)
    for start in (3, 4):
        for a, b in zip(full[start:], batches(start, 6 - start)):
            # The same code path reproducing itself: bit for bit.
            assert a["uid"] == b["uid"] and torch.equal(a["source"], b["source"])
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    log = MixtureLog(sources)
    for b in full:
        assert sum(log.add(b)) == 8
    assert sum(log.counts) == 48 and "weight 75.0%" in log.summary()


def test_ranks_partition_each_source(fmnist_shards: Path) -> None:
    sources = _sources(fmnist_shards, (1.0, 1.0))
    seen = []
    for rank in (0, 1):
        stream = ShardStream(sources, 8, None, None, rank=rank, world_size=2)
        raw = _raw(stream, 256, rank, 2)
        seen.append({json.loads(s["json"])["uid"] for s in raw})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_config_sources(fmnist_shards: Path, tmp_path: Path) -> None:
    text = f"""\
data:
  sources:
    - {{shards: "{fmnist_shards}/{{00000..00002}}.tar", weight: 3}}
    - {{shards: "{fmnist_shards}/00003.tar"}}
  resampled: true
output_dir: o
train: {{steps: 1}}
"""
    cfg = parse_train_config(text)
    assert (
        [s.weight for s in cfg.data.sources] == [3.0, 1.0] and cfg.data.resampled and cfg.data.shards is None
    )
    assert [len(s.shards) for s in data_sources(cfg.data)] == [3, 1]
    bad = {
        "both": ("data: {shards: a.tar, sources: [{shards: b.tar}]}", "exactly one of data.shards"),
        "neither": ("data: {workers: 0}", "exactly one of data.shards"),
        "weight": ("data: {sources: [{shards: b.tar, weight: 0}]}", r"data\.sources\[0\]\.weight .*> 0"),
        "nan": ("data: {sources: [{shards: b.tar, weight: .nan}]}", "finite"),
        "typo": ("data: {sources: [{shards: b.tar, wieght: 2}]}", "unknown key"),
        "empty": ("data: {sources: []}", "non-empty list"),
        "sizes": ("data: {sizes: s.json, sources: [{shards: b.tar}]}", "its own sizes"),
    }
    for data, message in bad.values():
        with pytest.raises(ConfigError, match=message):
            parse_train_config(f"{data}\noutput_dir: o\ntrain: {{steps: 1}}\n")
    twice = parse_train_config(
        f"data: {{sources: [{{shards: '{fmnist_shards}/*.tar'}}, {{shards: '{fmnist_shards}/00003.tar'}}]}}\n"
        "output_dir: o\ntrain: {steps: 1}\n"
    )
    with pytest.raises(ValueError, match=r"in two data\.sources"):
        data_sources(twice.data)


@pytest.fixture(scope="module")
def table(fmnist_shards, tmp_path_factory) -> Path:
    from train.mining.output import write_hard_pairs
    from train.mining.search import mine_hard_pairs

    uids = TarIndex(expand_shards(str(fmnist_shards / "*.tar"))).uids
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(len(uids), 16, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(len(uids), 16, generator=g), dim=1)
    idx, scores = mine_hard_pairs(u, v, 10)
    path = tmp_path_factory.mktemp("hard") / "hard_pairs.parquet"
    write_hard_pairs(path, uids, idx, scores, {"k": 10})
    return path


@pytest.mark.parametrize("resampled", [False, True])
def test_hard_pair_anchors_follow_the_weights(fmnist_shards: Path, table: Path, resampled: bool) -> None:
    sources = _sources(fmnist_shards)
    stream = HardPairStream(sources, 16, None, None, table_path=table, top=5, resampled=resampled)
    anchors = np.concatenate([stream.local_batch(s)[:8] for s in range(4 * stream.steps_per_epoch)])
    share_b = float(np.mean(stream.sample_source[anchors] == 1))
    assert share_b == pytest.approx(0.75, abs=0.03)  # 2,048 anchors over 4 epochs
    # Two ranks still partition each global batch's anchors; step s is a function of (seed, s).
    r0 = HardPairStream(sources, 16, None, None, table_path=table, top=5, rank=0, world_size=2)
    r1 = HardPairStream(sources, 16, None, None, table_path=table, top=5, rank=1, world_size=2)
    for s in (0, 5, 40):
        a0, a1 = r0.local_batch(s)[:8], r1.local_batch(s)[:8]
        assert not set(a0.tolist()) & set(a1.tolist())
        assert np.array_equal(a0, HardPairStream(sources, 16, None, None, table_path=table, top=5,
                                                 world_size=2).local_batch(s)[:8])  # fmt: skip


def test_training_on_a_mixture_logs_what_it_delivered_and_resumes(
    fmnist_shards: Path, tmp_path: Path, make_config, caplog
) -> None:
    def config(name: str) -> Path:
        path = make_config(tmp_path / f"{name}.yaml", fmnist_shards, tmp_path / name,
                           train={"steps": 6, "checkpoint_every": 3})  # fmt: skip
        cfg = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
        del cfg["data"]["shards"]
        cfg["data"]["sources"] = [
            {"shards": f"{fmnist_shards}/{{00000..00002}}.tar", "weight": 1},
            {"shards": f"{fmnist_shards}/00003.tar", "weight": 3},
        ]
        path.write_text(json.dumps(cfg))
        return path

    with caplog.at_level(logging.INFO, logger="train"):
        train(load_train_config(config("full")))
    recs = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    per_step = [(r["source_0_samples"], r["source_1_samples"]) for r in recs]
    assert all(a + b == 16 for a, b in per_step) and sum(b for _, b in per_step) > sum(a for a, _ in per_step)
    assert any("data mixture delivered" in m and "weight 75.0%" in m for m in caplog.messages)

    split = config("split")
    train(load_train_config(split))
    for p in list_checkpoints(tmp_path / "split")[1:]:
        p.unlink()
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "split" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    train(load_train_config(split), resume=True)
    resumed = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(recs, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert (a["source_0_samples"], a["source_1_samples"]) == (
            b["source_0_samples"],
            b["source_1_samples"],
        )
