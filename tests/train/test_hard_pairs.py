"""Hard-pair batches: structure, determinism and resume, a partition of the anchors across 2 gloo
ranks, the check that the table matches the data, and training with HNML end to end."""

from __future__ import annotations

import functools
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from curation.cli import main as curate
from train.config import ConfigError, load_train_config
from train.data import expand_shards, make_loader
from train.hard_pairs import HardPairStream, TarIndex
from train.loop import list_checkpoints, train
from train.mining.output import write_hard_pairs
from train.mining.search import mine_hard_pairs

TOP = 5


@pytest.fixture(scope="module")
def table(fmnist_shards, tmp_path_factory) -> Path:
    """A hard-pair table over the shards' 512 uids, mined from embeddings that cluster by class."""
    from train.fashion_mnist import load

    uids = TarIndex(expand_shards(str(fmnist_shards / "*.tar"))).uids
    _, labels = load("train")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 16, generator=g)
    cls = torch.tensor([int(labels[int(u.rsplit("-", 1)[1])]) for u in uids])
    u = F.normalize(centres[cls] + torch.randn(len(uids), 16, generator=g), dim=1)
    v = F.normalize(centres[cls] + torch.randn(len(uids), 16, generator=g), dim=1)
    idx, scores = mine_hard_pairs(u, v, 10)
    path = tmp_path_factory.mktemp("hard") / "hard_pairs.parquet"
    write_hard_pairs(path, uids, idx, scores, {"k": 10})
    return path


@functools.cache
def _model():
    from curation.models.clip import build_model

    return build_model("curate-tiny")


def _stream(shards: Path, table: Path, **kw) -> HardPairStream:
    built = _model()
    return HardPairStream(
        expand_shards(str(shards / "*.tar")), kw.pop("batch_size", 16), built.preprocess_train,
        built.tokenizer, table_path=table, top=TOP, **kw,
    )  # fmt: skip


def _top_lists(table: Path) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    return {r["uid"]: r["hard_uids"][:TOP] for r in pq.read_table(table).to_pylist()}


def test_batch_is_anchors_then_one_partner_each_from_its_top_list(fmnist_shards, table) -> None:
    stream = _stream(fmnist_shards, table, seed=3)
    tops = _top_lists(table)
    batches = iter(stream)
    for _ in range(3):
        b = next(batches)
        uids, partners = b["uid"], b["partners"]
        assert b["image"].shape == (16, 3, 28, 28) and b["text"].shape[0] == 16
        assert partners.dtype == torch.bool and partners.shape == (16, 16)
        assert len(set(uids)) == 16  # partners already in the batch are avoided while the list allows
        for i in range(8):
            assert uids[8 + i] in tops[uids[i]]  # pair (i, 8+i)
            assert partners[i, 8 + i]
        for i in range(16):  # the matrix is exactly "j is in i's top list"
            for j in range(16):
                assert bool(partners[i, j]) == (i != j and uids[j] in tops[uids[i]])


def test_batches_are_a_function_of_seed_and_step_whatever_the_workers(fmnist_shards, table) -> None:
    """What --resume relies on: starting at step s (any data.workers) gives the batches from s on."""
    full = iter(make_loader(_stream(fmnist_shards, table, seed=1), workers=0))
    want = [next(full)["uid"] for _ in range(6)]
    resumed = _stream(fmnist_shards, table, seed=1, start_step=3)
    got = iter(make_loader(resumed, workers=2))
    assert [next(got)["uid"] for _ in range(3)] == want[3:]
    other_seed = iter(_stream(fmnist_shards, table, seed=2))
    assert next(other_seed)["uid"] != want[0]


def test_an_epoch_visits_every_anchor_once(fmnist_shards, table) -> None:
    stream = _stream(fmnist_shards, table, batch_size=24)  # 12 anchors a step: 42 steps, 8 left over
    assert stream.steps_per_epoch == 512 // 12
    seen = np.concatenate([stream.local_batch(s)[:12] for s in range(stream.steps_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 42 * 12
    nxt = np.concatenate([stream.local_batch(s)[:12] for s in range(42, 84)])
    assert not np.array_equal(seen, nxt)  # a new order each epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, shards: Path, table: Path, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        stream = _stream(shards, table, rank=rank, world_size=world, seed=5)
        batches = iter(stream)
        mine = [next(batches)["uid"] for _ in range(stream.steps_per_epoch)]
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        out[rank] = {"batches": gathered, "steps": stream.steps_per_epoch}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_partition_the_anchors(fmnist_shards, table) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _rank_main, args=(2, _free_port(), fmnist_shards, table, out), nprocs=2, start_method="spawn"
        )
        results = dict(out)
    steps = results[0]["steps"]
    assert steps == 512 // 16  # 8 anchors per rank, 16 per global step
    per_rank = results[0]["batches"]
    anchors = [[u for b in per_rank[r] for u in b[:8]] for r in (0, 1)]
    assert not set(anchors[0]) & set(anchors[1])  # ranks never share an anchor
    assert sorted(anchors[0] + anchors[1]) == sorted(_top_lists(table))  # together: every anchor, once
    # Each rank's partners are in its own batch (the loss's block-diagonal assumption).
    tops = _top_lists(table)
    for r in (0, 1):
        for b in per_rank[r]:
            assert all(b[8 + i] in tops[b[i]] for i in range(8))


def test_a_table_that_does_not_match_the_data_is_refused(
    fmnist_shards, table, tmp_path, make_config, capsys
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(table)
    stale = pa.concat_tables([t.slice(0, 10), pa.table({
        "uid": ["not-in-the-data"], "hard_uids": [["fmnist-train-000000"]], "hard_scores": [[0.5]],
    }, schema=t.schema)])  # fmt: skip
    pq.write_table(stale, tmp_path / "stale.parquet")
    cfg = make_config(tmp_path / "c.yaml", fmnist_shards, tmp_path / "out",
                      hard_pairs={"path": str(tmp_path / "stale.parquet")})  # fmt: skip
    assert curate(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "does not match the training shards" in err and "not-in-the-data" in err and "Traceback" not in err


def test_config_errors(fmnist_shards, table, tmp_path, make_config) -> None:
    cfg = make_config(tmp_path / "a.yaml", fmnist_shards, tmp_path / "o", loss={"hnml": 0.3})
    with pytest.raises(ConfigError, match=r"hnml.*hard_pairs"):
        load_train_config(cfg)
    cfg = make_config(tmp_path / "b.yaml", fmnist_shards, tmp_path / "o", train={"batch_size": 15},
                      hard_pairs={"path": str(table), "top": 0}, loss={"hnml": -1})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        load_train_config(cfg)
    assert all(s in str(e.value) for s in ("must be even", "hard_pairs.top", "loss.hnml"))


@pytest.mark.slow
def test_hard_pair_training_with_margin_loss_resumes_exactly(
    fmnist_shards, table, tmp_path, make_config
) -> None:
    sections = {
        "hard_pairs": {"path": str(table), "top": TOP},
        "loss": {"name": "infonce", "hnml": 0.3},
        # epochs count samples as without hard pairs: 0.125 x 512 / 16 = 4 steps
        "train": {"steps": None, "epochs": 0.125, "checkpoint_every": 2, "keep_checkpoints": 0},
        "data": {"workers": 1},
    }
    full, split = tmp_path / "full", tmp_path / "split"
    train(load_train_config(make_config(tmp_path / "f.yaml", fmnist_shards, full, **sections)))
    cfg = load_train_config(make_config(tmp_path / "s.yaml", fmnist_shards, split, **sections))
    train(cfg)
    list_checkpoints(split)[-1].unlink()  # a crash after step 2's checkpoint
    result = train(cfg, resume=True)
    assert result.steps == 4
    a = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == 4 and a == pytest.approx(b, abs=1e-6)
    # The margin term is part of the loss: without it the first step's loss differs.
    plain = tmp_path / "plain"
    train(load_train_config(make_config(tmp_path / "p.yaml", fmnist_shards, plain,
                                        **{**sections, "loss": {"name": "infonce"}})))  # fmt: skip
    c = [json.loads(x)["loss"] for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert a[0] > c[0]


def test_shipped_recipes_parse(table, tmp_path) -> None:
    """train/configs/helip.yaml and mine_fashion_mnist.yaml are valid once their inputs exist."""
    from train.mining.config import parse_mine_config

    repo = Path(__file__).resolve().parents[2]
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"")
    cfg = load_train_config(
        repo / "train/configs/helip.yaml",
        overrides={"model.pretrained": str(ck), "hard_pairs.path": str(table)},
    )
    assert cfg.loss.hnml == 0.3 and cfg.hard_pairs is not None and cfg.hard_pairs.top == 50
    assert cfg.train.epochs == 2 and cfg.train.batch_size % 2 == 0
    text = (repo / "train/configs/mine_fashion_mnist.yaml").read_text()
    mine_cfg = parse_mine_config(text, overrides={"encoders.checkpoint": str(ck)})
    assert mine_cfg.mining.k == 50 and mine_cfg.output == "runs/fmnist_mined"


def test_hard_pair_batches_carry_distillation_targets(
    fmnist_concept_shards, table, tmp_path, make_config
) -> None:
    """HELIP's batches and DiHT's concept distillation together: partners come with their targets."""
    stream = _stream(fmnist_concept_shards, table, concept_vocabulary_size=30)
    batch = next(iter(stream))
    assert batch["partners"].shape == (16, 16)
    assert batch["concept_ids"].shape[0] == 16 and (batch["concept_ids"][:, 0] >= 0).all()
    out = tmp_path / "both"
    sections = {
        "hard_pairs": {"path": str(table), "top": TOP},
        "loss": {"name": "infonce", "hnml": 0.3},
        "distill": {"weight": 1.0},
        "train": {"steps": 2},
        "data": {"workers": 0},
    }
    train(load_train_config(make_config(tmp_path / "b.yaml", fmnist_concept_shards, out, **sections)))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["distill_loss"] > 0 for r in rows)
