"""Hard-pair mining: the library against a brute-force reference, and `curate mine` end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from curation.cli import main as curate
from train.mining.search import mine_hard_pairs

REPO = Path(__file__).resolve().parents[2]


def brute_force(u: torch.Tensor, v: torch.Tensor, k: int, near_duplicate: float):
    """docs/methods.md §3a on the full matrices: score = <u_i,u_j>·<v_i,v_j>, self and near-duplicates out."""
    su, sv = u @ u.T, v @ v.T
    score = su * sv
    score[(su > near_duplicate) | (sv > near_duplicate)] = float("-inf")
    score.fill_diagonal_(float("-inf"))
    kk = min(k, score.shape[1])
    s, i = score.topk(kk, dim=1)
    i[s == float("-inf")] = -1
    pad = k - kk
    s = torch.cat([s, s.new_full((s.shape[0], pad), float("-inf"))], dim=1)
    i = torch.cat([i, i.new_full((i.shape[0], pad), -1)], dim=1)
    return i, s


def _embeddings(n: int, d: int = 32, dtype=torch.float64, seed: int = 0):
    """Random pairs with planted near-duplicates: a cluster of images, and a block of identical texts."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    v = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    u[100:140] = F.normalize(u[100] + 0.02 * torch.randn(40, d, generator=g, dtype=dtype), dim=1)
    # 200 identical captions, every one a near-duplicate of the others. A one-hot vector, so that their
    # similarity is exactly 1.0 (and every other caption's with them exact) whatever the summation order:
    # the near_duplicate=1.0 decision must not depend on how a BLAS blocks the product.
    v[500:700] = 0.0
    v[500:700, 0] = 1.0
    return u, v


def assert_same_hard_pairs(got_i, got_s, want_i, want_s, u, v) -> None:
    """Same answer up to float rounding: scores within a few ulps of the reference, the same indices except
    where two candidates' scores tie within that tolerance (any order of a tie is right). A wrong candidate
    differs from the right one by far more than rounding (scores are products of cosines of random vectors)."""
    tol = 64 * torch.finfo(want_s.dtype).eps  # summation order over d=32 terms, then one product
    finite = torch.isfinite(want_s)
    assert torch.equal(finite, torch.isfinite(got_s)) and torch.equal(got_i == -1, want_i == -1)
    torch.testing.assert_close(got_s[finite], want_s[finite], rtol=0, atol=tol)
    swapped = (got_i != want_i).nonzero().tolist()
    for q, pos in swapped:  # a swap is right only inside a tie: the candidate has the reference's score
        j = int(got_i[q, pos])
        exact = float((u[q] @ u[j]) * (v[q] @ v[j]))
        assert abs(exact - float(want_s[q, pos])) <= tol, (q, pos, j)
    assert len(swapped) <= 0.001 * got_i.numel()  # ties are rare in random float64 data


@pytest.mark.parametrize("near_duplicate", [0.98, 0.3, 1.0])
def test_exact_blocked_search_equals_brute_force(near_duplicate: float) -> None:
    u, v = _embeddings(3000)
    want_i, want_s = brute_force(u, v, 50, near_duplicate)
    # Blocks smaller than N in both directions, so the running top-k merges across blocks.
    got_i, got_s = mine_hard_pairs(u, v, 50, near_duplicate, query_block=700, candidate_block=1100)
    # Different blocking, different summation order: equal up to rounding, not bit for bit (issue 20).
    assert_same_hard_pairs(got_i, got_s, want_i, want_s, u, v)
    # The planted near-duplicates really are excluded: no row of the text block lists another of it.
    if near_duplicate < 1:
        block = got_i[500:700]
        assert not ((block >= 500) & (block < 700)).any()
    assert not (got_i == torch.arange(3000)[:, None]).any()  # never itself


def test_float32_default_blocks_match_reference_scores() -> None:
    u, v = _embeddings(2500, dtype=torch.float32, seed=3)
    want_i, want_s = brute_force(u.double(), v.double(), 20, 0.98)
    got_i, got_s = mine_hard_pairs(u, v, 20)
    assert torch.allclose(got_s.double(), want_s, atol=1e-5)
    assert (got_i == want_i).float().mean() > 0.99  # float32 rounding may swap near-tied neighbours


def test_padding_when_fewer_candidates_than_k() -> None:
    u, v = _embeddings(3000)
    got_i, got_s = mine_hard_pairs(u[:20], v[:20], 50)
    assert got_i.shape == (20, 50)
    assert (got_i[:, 19:] == -1).all() and torch.isinf(got_s[:, 19:]).all()
    assert (got_i[:, :19] >= 0).all()
    one_i, one_s = mine_hard_pairs(u[:1], v[:1], 5)
    assert (one_i == -1).all() and torch.isinf(one_s).all()


def test_query_ranges_pool_and_faiss_share_the_exact_answer() -> None:
    u, v = _embeddings(3000)
    full_i, full_s = mine_hard_pairs(u, v, 30)
    part_i, _ = mine_hard_pairs(u, v, 30, queries=range(1000, 1700))
    assert torch.equal(part_i, full_i[1000:1700])
    # A pool as large as the set is exact search.
    pool_i, _ = mine_hard_pairs(u, v, 30, method="pool", pool_size=3000)
    assert torch.equal(pool_i, full_i)
    # A smaller pool: the same pools whatever the query split, and only pool members are returned.
    a_i, _ = mine_hard_pairs(u, v, 30, method="pool", pool_size=800, pool_refresh=500, seed=4)
    b_i, _ = mine_hard_pairs(
        u, v, 30, method="pool", pool_size=800, pool_refresh=500, seed=4, queries=range(700, 1300)
    )
    assert torch.equal(a_i[700:1300], b_i)
    assert len(set(a_i[:500].flatten().tolist()) - {-1}) <= 800
    # FAISS re-scores its candidates exactly: with every pair a candidate it is the exact search.
    pytest.importorskip("faiss")
    _, f_s = mine_hard_pairs(u.float(), v.float(), 30, method="faiss", faiss_candidates=100)
    assert torch.allclose(f_s.double(), full_s, atol=1e-5)


def test_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="same N"):
        mine_hard_pairs(torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="k must be"):
        mine_hard_pairs(torch.zeros(3, 4), torch.zeros(3, 4), k=0)


# --------------------------------------------------------------------------- curate mine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised curate-tiny checkpoint in the trainer's format."""
    from curation.models.clip import build_model

    torch.manual_seed(0)
    built = build_model("curate-tiny")
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"state_dict": built.model.state_dict(), "model_name": "curate-tiny"}, path)
    return path


@pytest.fixture(scope="module")
def mined(fmnist_shards, checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mined") / "out"
    rc = curate(["mine", "--shards", str(fmnist_shards / "*.tar"), "--checkpoint", str(checkpoint),
                 "-o", str(out), "--k", "8", "--no-progress"])  # fmt: skip
    assert rc == 0
    return out


def _table(out: Path) -> list[dict]:
    return pq.read_table(out / "hard_pairs.parquet").to_pylist()


def test_mine_writes_hard_pairs_for_every_uid(mined, fmnist_shards, capsys) -> None:
    from curation.query import connect
    from train.mining.output import read_parameters

    rows = _table(mined)
    assert len(rows) == 512 and len({r["uid"] for r in rows}) == 512
    uids = {r["uid"] for r in rows}
    for r in rows:
        assert len(r["hard_uids"]) == 8 and r["uid"] not in r["hard_uids"]
        assert set(r["hard_uids"]) <= uids
        assert r["hard_scores"] == sorted(r["hard_scores"], reverse=True)
    params = read_parameters(mined / "hard_pairs.parquet")
    assert params["k"] == 8 and params["near_duplicate"] == 0.98 and params["pairs"] == 512
    # The same scores the library gives on the stored embeddings.
    from train.mining.store import MineDir, load_embeddings

    shards = sorted(str(p) for p in fmnist_shards.glob("*.tar"))
    u_ids, img, txt = load_embeddings(MineDir(mined), shards)
    idx, _ = mine_hard_pairs(img, txt, 8)
    assert [u_ids[j] for j in idx[0].tolist()] == rows[0]["hard_uids"]
    # Queryable like the manifests.
    con = connect(mined)
    assert con.execute("SELECT count(*), min(len(hard_uids)) FROM hard_pairs").fetchall() == [(512, 8)]
    assert curate(["query", str(mined), "SELECT count(*) AS n FROM hard_pairs"]) == 0
    assert "512" in capsys.readouterr().out


def test_remining_reuses_embeddings_and_other_encoders_are_refused(
    mined, fmnist_shards, checkpoint, tmp_path, capsys
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (mined / "embeddings").glob("*.parquet")}
    rc = curate(["mine", "--shards", str(fmnist_shards / "*.tar"), "--checkpoint", str(checkpoint), "-o", str(mined),
                 "--k", "3", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "0 shard(s) embedded, 4 reused" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (mined / "embeddings").glob("*.parquet")} == before
    assert all(len(r["hard_uids"]) == 3 for r in _table(mined))
    # Other weights: the stored embeddings are not theirs.
    other = tmp_path / "other.pt"
    ck = torch.load(checkpoint, weights_only=True)
    ck["state_dict"]["logit_scale"] += 1
    torch.save(ck, other)
    rc = curate(
        ["mine", "--shards", str(fmnist_shards / "*.tar"), "--checkpoint", str(other), "-o", str(mined)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "image.sha256" in err and "Traceback" not in err


def test_bad_usage_is_one_clear_line(tmp_path, capsys) -> None:
    assert curate(["mine", "--shards", "x/*.tar", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curate: error:") and "encoders.checkpoint" in err
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "data: {shards: x}\noutput: o\nencoders: {checkpoint: nope.pt}\nmining: {k: 0, metod: exact}\n"
    )
    assert curate(["mine", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "mining.metod (line 4): unknown key" in err
    cfg.write_text("data: {shards: x}\noutput: o\nencoders: {checkpoint: nope.pt}\nmining: {k: 0}\n")
    assert curate(["mine", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err and "mining.k (line 4): must be >= 1" in err  # every problem at once


@pytest.mark.slow
def test_separate_text_model_minilm(fmnist_shards, checkpoint, tmp_path) -> None:
    from train.mining.store import MineDir, load_embeddings

    out = tmp_path / "minilm"
    shard = str(fmnist_shards / "00000.tar")
    rc = curate(["mine", "--shards", shard, "--checkpoint", str(checkpoint), "-o", str(out),
                 "--text-model", "all-MiniLM-L6-v2", "--k", "5", "--no-progress"])  # fmt: skip
    assert rc == 0
    _, img, txt = load_embeddings(MineDir(out), [shard])
    assert img.shape == (128, 128) and txt.shape == (128, 384)  # curate-tiny's 128-d, MiniLM's 384-d
    assert torch.allclose(txt.norm(dim=1), torch.ones(128), atol=1e-4)
    # Four caption templates per class, so each caption has identical twins: near-duplicates, never partners.
    from train.fashion_mnist import CLASSES, TEMPLATES, load

    _, labels = load("train")
    caption = {
        f"fmnist-train-{i:06d}": TEMPLATES[i % 4].format(CLASSES[labels[i]]) for i in range(len(labels))
    }
    rows = _table(out)
    assert all(caption[h] != caption[r["uid"]] for r in rows for h in r["hard_uids"])
    assert all(len(r["hard_uids"]) == 5 for r in rows)


@pytest.mark.slow
def test_separate_image_teacher_and_text_model(fmnist_shards, checkpoint, tmp_path, capsys) -> None:
    """HELIP's own set-up: two frozen encoders of the user's choice, no CLIP checkpoint at all."""
    from curation.models.efficientnet_lite0 import default_checkpoint
    from curation.models.teachers import load_teacher
    from train.mining.output import read_parameters
    from train.mining.store import MineDir, load_embeddings

    out = tmp_path / "teacher"
    shard = str(fmnist_shards / "00000.tar")
    rc = curate(["mine", "--shards", shard, "-o", str(out), "--image-teacher", "efficientnet_lite0",
                 "--text-model", "all-MiniLM-L6-v2", "--k", "5", "--no-progress"])  # fmt: skip
    assert rc == 0
    _, img, txt = load_embeddings(MineDir(out), [shard])
    assert img.shape == (128, 1280) and txt.shape == (128, 384)  # EfficientNet-Lite0's pooled 1280-d
    # The stored embedding is the teacher's own pooled feature of the stored image, normalised.
    from curation.core.imageio import open_image, to_rgb
    from train.data import IMAGE_KEYS, _raw_samples

    teacher = load_teacher("efficientnet_lite0", device="cpu")
    first = next(iter(_raw_samples(shard)))
    data = next(first[k] for k in IMAGE_KEYS if k in first)
    ref = teacher.features(teacher.preprocess(to_rgb(open_image(data)))[None])[0]
    assert torch.allclose(img[0], torch.nn.functional.normalize(ref, dim=0), atol=1e-4)
    fp = json.loads((out / "mine.json").read_text())
    assert fp["encoders"]["image"]["teacher"] == "efficientnet_lite0"
    assert fp["encoders"]["image"]["checkpoint_sha256"]
    assert fp["encoders"]["text"]["kind"] == "sentence-transformers"
    assert read_parameters(out / "hard_pairs.parquet")["k"] == 5
    assert default_checkpoint()
    # Another image encoder is refused on the same output: the embeddings would mix two spaces.
    rc = curate(["mine", "--shards", shard, "-o", str(out), "--checkpoint", str(checkpoint),
                 "--text-model", "all-MiniLM-L6-v2", "--k", "5", "--no-progress"])  # fmt: skip
    assert rc == 2


def test_image_teacher_config_problems(tmp_path) -> None:
    from curation.config import ConfigError
    from train.validation import parse_checked_mine_config

    base = f"data: {{shards: {tmp_path}/x.tar}}\noutput: {tmp_path}/out\n"
    with pytest.raises(ConfigError) as e:
        parse_checked_mine_config(base + "encoders: {image_teacher: efficientnet_lite0}\n")
    assert "needed unless both image_teacher and text_model are given" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_checked_mine_config(
            base
            + "encoders: {image_teacher: timm, image_teacher_model: resnet18, text_model: all-MiniLM-L6-v2}\n"
        )
    assert "encoders.image_teacher" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_checked_mine_config(base + "encoders: {image_teacher: nope, text_model: all-MiniLM-L6-v2}\n")
    assert "unknown teacher 'nope'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_checked_mine_config(
            base + f"encoders: {{image_teacher_checkpoint: {tmp_path}/t.pt, text_model: all-MiniLM-L6-v2}}\n"
        )
    assert "image_teacher_* keys are given but image_teacher is not" in str(e.value)
    cfg = parse_checked_mine_config(
        base + "encoders: {image_teacher: efficientnet_lite0, text_model: all-MiniLM-L6-v2}\n"
    )
    assert cfg.encoders.checkpoint is None


@pytest.mark.slow
def test_killed_mid_embedding_resumes_without_loss_or_duplicates(fmnist_shards, checkpoint, tmp_path) -> None:
    """kill -9 once the first shard is committed; the re-run embeds only the rest; same result as one run."""
    out, ref = tmp_path / "killed", tmp_path / "ref"
    args = ["mine", "--shards", str(fmnist_shards / "*.tar"), "--checkpoint", str(checkpoint), "--k", "8",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from curation.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "-o", str(out)], env=env, start_new_session=True
    )
    try:
        while proc.poll() is None and not any((out / "ledger").glob("*.json")):
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name for p in (out / "ledger").glob("*.json")}
    assert done, "the first shard was never committed"
    assert curate([*args, "-o", str(out)]) == 0
    assert curate([*args, "-o", str(ref)]) == 0
    entries = [json.loads(p.read_text()) for p in (out / "ledger").glob("*.json")]
    assert sorted(e["shard"] for e in entries) == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert not [p for p in (out / "embeddings" / ".tmp").rglob("*") if not p.is_dir()]
    assert _table(out) == _table(ref)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_runner_mines_the_same_table(mined, fmnist_shards, checkpoint, tmp_path) -> None:
    """Query blocks as Ray tasks (a private network namespace, as tests/test_ray_runner.py) == local."""
    from tests.test_ray_runner import NETNS
    from tests.test_ray_runner import curate as in_ray_session

    if NETNS is None:
        pytest.skip("cannot create a network namespace (unshare -n / -rn); Ray must stay on loopback")
    out = tmp_path / "ray"
    proc, codes = in_ray_session(
        [
            "mine",
            "--shards",
            str(fmnist_shards / "*.tar"),
            "--checkpoint",
            str(checkpoint),
            "-o",
            str(out),
            "--k",
            "8",
            "--runner",
            "ray",
            "--set",
            "runner.queries_per_task=100",
            "--no-progress",
        ]
    )
    assert codes == [0], proc.stderr[-3000:]
    local = tmp_path / "local"
    rc = curate(["mine", "--shards", str(fmnist_shards / "*.tar"), "--checkpoint", str(checkpoint), "-o", str(local),
                 "--k", "8", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert _table(out) == _table(local)  # 6 tasks of 100 queries (the last 12) == one process
