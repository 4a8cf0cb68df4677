"""`curate dedup`: near-duplicate pairs without all-pairs, groups over a whole run, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.dedup import DedupParams, run_dedup
from curation.near_duplicates import components, near_pairs, spherical_kmeans
from curation.schema import make_uid
from tests.helpers import REPO
from tests.images import PHOTOS, encode, near_duplicates, photo


def brute_force_groups(hashes: np.ndarray, radius: int) -> np.ndarray:
    h = hashes.view(np.uint64)
    close = np.bitwise_count(h[:, None] ^ h[None, :]) <= radius
    a, b = np.nonzero(np.triu(close, 1))
    return components(len(h), a, b)


@pytest.mark.parametrize("radius", [0, 1, 3, 6, 9])
def test_near_pairs_give_the_groups_of_all_pairs(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(0, 2**64, 1500, dtype=np.uint64)
    copies = base[rng.integers(0, len(base), 600)].copy()
    for i in range(len(copies)):  # 0 .. radius + 2 flipped bits: some copies fall outside the radius
        for bit in rng.choice(64, rng.integers(0, radius + 3), replace=False):
            copies[i] ^= np.uint64(1) << np.uint64(bit)
    hashes = np.concatenate([base, copies, base[:40]]).view(np.int64)
    a, b = near_pairs(hashes, radius)
    assert np.all(a < b)
    assert np.all(np.bitwise_count(hashes.view(np.uint64)[a] ^ hashes.view(np.uint64)[b]) <= radius)
    expected = brute_force_groups(hashes, radius)
    np.testing.assert_array_equal(components(len(hashes), a, b), expected)
    # any number of blocks > radius finds the same pairs, only the cost differs; with many blocks
    # the key is too wide to share 64 bits with the row index and is hashed (more candidates)
    for blocks in {radius + 3, max(8, radius + 1)} if radius else ():
        a, b = near_pairs(hashes, radius, blocks=blocks)
        assert len(set(zip(a.tolist(), b.tolist()))) == len(a)  # each pair once
        np.testing.assert_array_equal(components(len(hashes), a, b), expected)


def test_components_and_kmeans_are_deterministic():
    labels = components(7, np.array([0, 5, 3, 2]), np.array([1, 6, 4, 4]))
    assert labels.tolist() == [0, 0, 2, 2, 2, 5, 5]
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(500, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    first = spherical_kmeans(emb, 12, 20, seed=3)
    assert np.array_equal(first, spherical_kmeans(emb, 12, 20, seed=3))
    assert set(first.tolist()) <= set(range(12))


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory) -> Path:
    """An image_folder run over real photos, their near-duplicates and an exact copy in another shard."""
    root = tmp_path_factory.mktemp("dedup")
    imgs = root / "imgs"
    imgs.mkdir()
    for name in PHOTOS:
        img = photo(name)
        (imgs / f"{name}.png").write_bytes(encode(img, "PNG"))
        (imgs / f"{name}.txt").write_text(f"a photo: {name}")
        for kind, copy in near_duplicates(img).items():
            data = copy if isinstance(copy, bytes) else encode(copy, "JPEG", quality=90)
            (imgs / f"{name}_{kind}.jpg").write_bytes(data)
            (imgs / f"{name}_{kind}.txt").write_text(f"{name}, {kind} copy")
    # the same bytes and caption under another name sorting into the last shard: an exact duplicate
    shutil.copy(imgs / "coffee.png", imgs / "zz_coffee.png")
    (imgs / "zz_coffee.txt").write_text("a  photo:&#32;coffee")  # the same caption once cleaned
    cfg = root / "p.yaml"
    cfg.write_text(
        f"input: {{format: image_folder, path: {imgs}, rows_per_shard: 7}}\n"
        f"output: {root / 'run'}\n"
        "runner: {type: local, workers: 1, progress: false}\n"
        "stages:\n  - image_size: {min_side: 0}\n  - phash: {}\n"
    )
    assert main(["run", str(cfg)]) == 0
    return root / "run"


def file_of(con, uid_rows) -> list[str]:
    return [Path(u).name for (u,) in uid_rows]


def test_near_duplicates_of_real_photos_are_grouped_and_distinct_photos_are_not(photo_run, capsys):
    assert main(["dedup", str(photo_run)]) == 0
    out = capsys.readouterr()
    assert "semantic: skipped, the run has no clip_image_embedding column" in out.err
    con = duckdb.connect()
    manifests = photo_run / "manifests" / "*.parquet"
    table = pq.read_table(photo_run / "dedup" / "dedup.parquet")
    assert table.column_names == ["uid", "dup_group", "dup_rank", "dup_keep", "dup_kind"]
    rows = con.execute(
        f"SELECT regexp_extract(url, '[^/]+$'), dup_group, dup_rank, dup_keep, dup_kind, shard "
        f"FROM '{manifests}' JOIN '{photo_run / 'dedup' / 'dedup.parquet'}' USING (uid)"
    ).fetchall()
    group_of = {f: g for f, g, *_ in rows}
    photo_of = {f: f.split("_")[0].split(".")[0] for f in group_of}
    photo_of["zz_coffee.png"] = "coffee"
    for name in PHOTOS:  # every copy of a photo in one group ...
        assert len({g for f, g in group_of.items() if photo_of[f] == name}) == 1, name
        assert sum(photo_of[f] == name for f in group_of) == 4 + (name == "coffee")
    # ... and no two photos share one
    assert len(set(group_of.values())) == len(PHOTOS)
    kinds = {f: k for f, _, _, _, k, _ in rows}
    shards = {f: s for f, *_, s in rows}
    assert kinds["zz_coffee.png"] == "exact" and kinds["coffee.png"] == "exact"
    assert shards["zz_coffee.png"] != shards["coffee.png"]  # found across shards
    assert kinds["astronaut_half.jpg"] == "phash"
    # one representative per group: the largest image (the rule has no keep/clip_score to go by here),
    # so never the halved or cropped copy; ties (the re-encoded JPEG) go to the smaller uid
    keep = sorted(f for f, _, _, k, _, _ in rows if k)
    assert len(keep) == len(PHOTOS)
    assert not any(f.endswith(("_half.jpg", "_crop.jpg")) for f in keep)


def test_query_and_select_join_the_table(photo_run, tmp_path, capsys):
    run_dedup(photo_run, DedupParams())
    assert (
        main(
            [
                "query",
                str(photo_run),
                "SELECT count(*) AS n FROM samples JOIN dedup USING (uid) WHERE dup_keep",
            ]
        )
        == 0
    )
    assert f"{len(PHOTOS)}" in capsys.readouterr().out
    out = tmp_path / "uids.parquet"
    assert main(["select", str(photo_run), "--dedup", "--uids-only", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == len(PHOTOS)  # every sample here has a duplicate
    # --dedup picks the best-ranked row among those --where selects, even if it is not the run-wide one
    out2 = tmp_path / "jpgs.parquet"
    assert (
        main(
            [
                "select",
                str(photo_run),
                "--where",
                "url LIKE '%.jpg'",
                "--dedup",
                "--uids-only",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert pq.read_table(out2).num_rows == len(PHOTOS)
    shards = tmp_path / "shards"
    assert main(["select", str(photo_run), "--dedup", "--out", str(shards)]) == 0
    assert sum(__import__("json").loads((shards / "sizes.json").read_text()).values()) == len(PHOTOS)
    capsys.readouterr()


def test_rerun_is_a_no_op_and_parameters_change_it(photo_run, capsys):
    first = run_dedup(photo_run, DedupParams())
    table = pq.read_table(photo_run / "dedup" / "dedup.parquet")
    assert main(["dedup", str(photo_run)]) == 0
    assert "up to date" in capsys.readouterr().err
    assert pq.read_table(photo_run / "dedup" / "dedup.parquet").equals(table)
    strict = run_dedup(photo_run, DedupParams(radius=0))
    assert strict["fingerprint"] != first["fingerprint"]
    assert strict["rows_in_groups"] < first["rows_in_groups"]  # crops and resizes are not bit-identical
    run_dedup(photo_run, DedupParams())  # leave the default table for the other tests


def test_bad_usage_is_one_clear_line(tmp_path, photo_run, capsys):
    for argv in (
        ["dedup", str(tmp_path / "nothing")],
        ["dedup", str(photo_run), "--kinds", "exact,fuzzy"],
        ["dedup", str(photo_run), "--radius", "40"],
        ["dedup", str(photo_run), "--eps", "0"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("curate: error: ") and "Traceback" not in err
    commit(pa.table({"uid": ["a"], "keep": [True]}), tmp_path / "run")
    assert (
        main(
            ["select", str(tmp_path / "run"), "--dedup", "--uids-only", "--out", str(tmp_path / "u.parquet")]
        )
        == 2
    )
    assert "run `curate dedup OUTPUT` first" in capsys.readouterr().err


# --------------------------------------------------------------------------- semantic, resume


def commit(table: pa.Table, run: Path, shard: int = 0) -> None:
    """Write `table` as shard `shard` of `run` and its ledger entry (readers see only committed shards)."""
    (run / "manifests").mkdir(parents=True, exist_ok=True)
    (run / "ledger").mkdir(exist_ok=True)
    pq.write_table(table, run / "manifests" / f"shard-{shard:05d}.parquet")
    entry = {"shard": shard, "rows": table.num_rows, "kept": 0}
    (run / "ledger" / f"shard-{shard:05d}.json").write_text(json.dumps(entry))


def synthetic_run(root: Path, n: int, dim: int, seed: int = 0) -> Path:
    """Manifests as a run with clip_score(keep_embedding) and phash writes them, over synthetic values."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    copies = rng.integers(0, n, n // 10)
    emb[-len(copies) :] = emb[copies] + rng.normal(scale=0.01, size=(len(copies), dim))  # near-identical
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    hashes = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    hashes[-len(copies) :] = hashes[copies]
    for shard, rows in enumerate(np.array_split(np.arange(n), 4)):
        commit(
            pa.table(
                {
                    "uid": [make_uid(f"u{i}", "c") for i in rows],
                    "shard": pa.array([shard] * len(rows), pa.int32()),
                    "keep": rng.random(len(rows)) < 0.9,
                    "clip_score": pa.array(rng.random(len(rows)), pa.float32()),
                    "phash": hashes[rows],
                    "clip_image_embedding": pa.array(
                        list(emb[rows].astype(np.float16)), pa.list_(pa.float16())
                    ),
                }
            ),
            root,
            shard,
        )
    return root


def test_semantic_links_are_the_close_pairs_within_clusters(tmp_path):
    run = synthetic_run(tmp_path / "run", 800, 24)
    summary = run_dedup(run, DedupParams(kinds=("semantic",), eps=0.02, clusters=4))
    assert summary["rows_by_kind"]["semantic"] > 0 and summary["skipped"] == {}
    table = pq.read_table(run / "dedup" / "dedup.parquet")
    con = duckdb.connect()
    glob = run / "manifests" / "*.parquet"
    emb_rows = con.execute(f"SELECT uid, clip_image_embedding FROM '{glob}' ORDER BY uid").fetchall()
    emb = np.array([e for _, e in emb_rows], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # every near-identical pair (cosine > 0.98) landed in one group, whatever cluster it fell in
    a, b = np.nonzero(np.triu(emb @ emb.T > 0.98, 1))
    group = dict(zip(table.column("uid").to_pylist(), table.column("dup_group").to_pylist()))
    uids = [u for u, _ in emb_rows]
    assert len(a) > 0
    assert all(uids[i] in group and group[uids[i]] == group.get(uids[j]) for i, j in zip(a, b))
    assert set(table.column("dup_kind").to_pylist()) == {"semantic"}
    # one representative each, chosen by the rule: kept rows first, then the higher clip_score
    rep = con.execute(
        f"SELECT dup_group, bool_and(keep OR NOT dup_keep) OR NOT bool_or(keep) FROM '{glob}' JOIN "
        f"'{run / 'dedup' / 'dedup.parquet'}' USING (uid) GROUP BY 1"
    ).fetchall()
    assert all(ok for _, ok in rep)


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_groups(tmp_path):
    reference = synthetic_run(tmp_path / "reference", 60_000, 32)
    run_dedup(reference, DedupParams(clusters=600))
    expected = pq.read_table(reference / "dedup" / "dedup.parquet")

    run = synthetic_run(tmp_path / "killed", 60_000, 32)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "curation.cli", "dedup", str(run), "--clusters", "600"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    # kill it once the phash links are saved, while the semantic step (k-means) runs
    while not list((run / "dedup" / ".work").glob("*/phash.npz")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "dedup finished before it could be killed"
    assert not (run / "dedup" / "dedup.parquet").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert "links" in done.stderr
    assert pq.read_table(run / "dedup" / "dedup.parquet").equals(expected)
    assert not (run / "dedup" / ".work").exists()


def test_repeated_input_rows_count_once(tmp_path):
    run = tmp_path / "run"
    uids = [make_uid("a", "x"), make_uid("a", "x"), make_uid("b", "y")]
    commit(
        pa.table(
            {"uid": uids, "shard": pa.array([0, 0, 0], pa.int32()), "keep": [True] * 3, "phash": [5, 5, 7]}
        ),
        run,
    )
    summary = run_dedup(run, DedupParams())
    assert summary["rows"] == 2 and summary["rows_in_groups"] == 2  # 5 and 7 are 1 bit apart
    assert REPO.is_dir()


def test_a_run_without_duplicates_gives_an_empty_table(tmp_path):
    """No link at all (distinct hashes far apart): an empty dedup table, and select --dedup keeps all."""
    run = tmp_path / "run"
    uids = [make_uid(str(i), "x") for i in range(3)]
    hashes = [0, 0x00FF00FF00FF00FF, 0x7F00FF00FF00FF00]
    sha256 = ["a" * 64, "b" * 64, None]  # the same caption, distinct bytes: no exact link either
    table = {"uid": uids, "shard": pa.array([0] * 3, pa.int32()), "keep": [True] * 3, "phash": hashes}
    commit(pa.table(table | {"sha256": sha256, "caption": ["c"] * 3}), tmp_path / "run")
    summary = run_dedup(run, DedupParams())
    assert summary["rows"] == 3 and summary["rows_in_groups"] == 0
    out = tmp_path / "uids.parquet"
    assert main(["select", str(run), "--dedup", "--uids-only", "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 3


# --------------------------------------------------------------------------- against a brute force


def brute_force_table(rows: list[dict], radius: int) -> dict[str, tuple]:
    """uid -> (dup_group, dup_rank, dup_keep, dup_kind) by the definitions, comparing all pairs."""
    from curation.core.text import clean_caption

    firsts: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["shard"]):  # a repeated uid is its first row
        firsts.setdefault(r["uid"], r)
    rs = [firsts[u] for u in sorted(firsts)]
    n = len(rs)
    kind = [2] * n  # 0 exact, 1 phash, 2 none
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            x, y = rs[i], rs[j]
            exact = x["sha256"] is not None and x["sha256"] == y["sha256"]
            exact = exact and clean_caption(x["caption"]) == clean_caption(y["caption"])
            close = x["phash"] is not None and y["phash"] is not None
            close = close and bin((x["phash"] ^ y["phash"]) & (2**64 - 1)).count("1") <= radius
            if exact or close:
                code = 0 if exact else 1
                kind[i], kind[j] = min(kind[i], code), min(kind[j], code)
                parent[max(root(i), root(j))] = min(root(i), root(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)

    def rule(i: int) -> tuple:
        r = rs[i]
        pixels = r["original_width"] * r["original_height"] if r["original_width"] is not None else -1.0
        clip = r["clip_score"] if r["clip_score"] is not None else -2.0
        return (not r["keep"], -clip, -pixels, i)

    out = {}
    for number, (_, members) in enumerate(sorted((g, m) for g, m in groups.items() if len(m) > 1)):
        for rank, i in enumerate(sorted(members, key=rule)):
            out[rs[i]["uid"]] = (number, rank, rank == 0, ("exact", "phash")[kind[i]])
    return out


def test_groups_equal_a_brute_force_over_all_pairs(tmp_path, capsys):
    """Exact copies (captions equal once cleaned), near and far phashes, chains across kinds, null
    sha256/phash/clip_score/size, a uid repeated in two shards: `curate dedup`'s table is the one the
    definitions give by comparing every pair, and a null phash leaves the other hashes' bits alone."""
    rng = np.random.default_rng(7)
    base = rng.integers(-(2**63), 2**63 - 1, 60, dtype=np.int64)
    rows = []
    for i in range(240):
        image = int(rng.integers(0, 60)) if i >= 60 else i
        phash = int(base[image])
        if i >= 60 and rng.random() < 0.5:  # a near (<= 6 bits) or far (7-9 bits) copy
            for bit in rng.choice(64, int(rng.integers(1, 10)), replace=False):
                phash ^= 1 << int(bit)
            phash = (phash + 2**63) % 2**64 - 2**63
        caption = f"photo {image}" + (" " if rng.random() < 0.3 else "") + ("&amp;" if i % 7 == 0 else "&")
        rows.append(
            {
                "uid": make_uid(f"u{i}", caption),
                "shard": i % 3,
                "keep": bool(rng.random() < 0.7),
                "clip_score": None if i % 11 == 0 else float(np.float32(rng.random())),
                "original_width": None if i % 13 == 0 else int(rng.integers(100, 400)),
                "original_height": None if i % 13 == 0 else int(rng.integers(100, 400)),
                "sha256": None if i % 17 == 0 else f"{image:064x}",
                "caption": caption,
                "phash": None if i % 19 == 0 else phash,
            }
        )
    rows.append({**rows[5], "shard": 2, "keep": not rows[5]["keep"]})  # a uid in two shards: its first row
    # bits a float64 cannot hold, beside a null: 10 bits apart, never linked
    for i, h in enumerate((2**62, 2**62 + 0x3FF)):
        rows.append({**rows[0], "uid": make_uid(f"far{i}", "x"), "sha256": None, "phash": h, "shard": 0})
    types = {"shard": pa.int32(), "clip_score": pa.float32(), "original_width": pa.int32()}
    types |= {"original_height": pa.int32(), "phash": pa.int64()}
    for shard in range(3):
        part = [r for r in rows if r["shard"] == shard]
        table = pa.table({c: pa.array([r[c] for r in part], types.get(c)) for c in rows[0]})
        commit(table, tmp_path / "run", shard)

    assert main(["dedup", str(tmp_path / "run"), "--kinds", "exact,phash"]) == 0
    table = pq.read_table(tmp_path / "run" / "dedup" / "dedup.parquet")
    got = {r["uid"]: (r["dup_group"], r["dup_rank"], r["dup_keep"], r["dup_kind"]) for r in table.to_pylist()}
    expected = brute_force_table(rows, 6)
    assert got == expected
    kinds = {k for *_, k in expected.values()}
    assert kinds == {"exact", "phash"} and len(expected) > 100 and len(expected) < 240
    assert make_uid("far0", "x") not in got and make_uid("far1", "x") not in got
    capsys.readouterr()
