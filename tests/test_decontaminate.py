"""`curate decontaminate`: the hash matching against brute force, and the command end to end on real
photos: matches with both sides' ids, `curate select` leaving them out (or not), eval sets on S3."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from curation.cli import main
from curation.decontaminate import match_hashes

GOOD = "A man rides a red bicycle down the street."


@pytest.mark.parametrize("radius", [0, 3, 8])
def test_match_hashes_finds_every_pair_brute_force_finds(radius):
    rng = np.random.default_rng(radius)
    base = rng.integers(-(2**63), 2**63 - 1, 40, dtype=np.int64)
    flips = rng.integers(0, 64, (200, 4))
    pool = base[rng.integers(0, 40, 200)].copy()
    for k in range(200):  # near copies: a few bits flipped
        for bit in flips[k, : rng.integers(0, 5)]:
            pool[k] ^= np.int64(1) << np.int64(bit) if bit < 63 else np.int64(-(2**63))
    evals = np.concatenate([base[:10], pool[:5], rng.integers(-(2**63), 2**63 - 1, 20, dtype=np.int64)])
    pi, ei, d = match_hashes(pool, evals, radius)
    brute = np.bitwise_count(pool.view(np.uint64)[:, None] ^ evals.view(np.uint64)[None, :])
    want = sorted(zip(*np.nonzero(brute <= radius)))
    assert sorted(zip(pi.tolist(), ei.tolist())) == [(int(a), int(b)) for a, b in want]
    assert (d == brute[pi, ei]).all() and len(want) > 0


def jpeg(array: np.ndarray, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    img = Image.fromarray(array)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


POOL = {
    "astronaut": skimage.data.astronaut(),
    "chelsea": skimage.data.chelsea(),
    "coffee": skimage.data.coffee(),
    "rocket": skimage.data.rocket(),
    "camera": np.stack([skimage.data.camera()] * 3, -1),
}


def make_run(tmp_path: Path, stages: str = "  - phash: {}\n") -> Path:
    folder = tmp_path / "pool"
    folder.mkdir()
    for name, array in POOL.items():
        (folder / f"{name}.jpg").write_bytes(jpeg(array))
        (folder / f"{name}.txt").write_text(GOOD)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {folder}}}
output: {tmp_path / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
{stages}"""
    )
    assert main(["run", str(cfg)]) == 0
    return tmp_path / "run"


def eval_sets(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with a resized, re-encoded astronaut and an unrelated image; a tar with a chelsea copy."""
    folder = tmp_path / "eval-folder"
    folder.mkdir()
    (folder / "astro_small.jpg").write_bytes(jpeg(POOL["astronaut"], (200, 200), 70))
    (folder / "hubble.png").write_bytes(jpeg(skimage.data.hubble_deep_field()[:256, :256]))
    tar_path = tmp_path / "eval.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, data in {
            "cat01": jpeg(POOL["chelsea"], (225, 150), 80),
            "noise": jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        }.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder, tar_path


def selected_count(folder: Path) -> int:
    return sum(json.loads((folder / "sizes.json").read_text()).values())


def test_decontaminate_writes_both_ids_and_select_leaves_matches_out(tmp_path, capsys):
    run = make_run(tmp_path)
    folder, tar_path = eval_sets(tmp_path)
    assert main(["decontaminate", str(run), "--against", str(folder), str(tar_path)]) == 0
    assert "2 pool sample(s) match 2 of 4 evaluation image(s)" in capsys.readouterr().out
    matches = pq.read_table(run / "decontamination" / "matches.parquet").to_pylist()
    pairs = sorted((Path(m["pool_image_path"]).stem, m["eval_set"], m["eval_id"]) for m in matches)
    assert pairs == [
        ("astronaut", str(folder), "astro_small.jpg"),
        ("chelsea", str(tar_path), "eval.tar#cat01"),
    ]
    assert all(m["kind"] == "phash" and 0 <= m["distance"] <= 6 for m in matches)
    summary = json.loads((run / "decontamination" / "decontamination.json").read_text())
    assert summary["against"] == {str(folder): 2, str(tar_path): 2}

    assert main(["select", str(run), "--out", str(tmp_path / "clean")]) == 0
    assert "2 selected uid(s) match evaluation images" in capsys.readouterr().out
    assert selected_count(tmp_path / "clean") == 3
    assert main(["select", str(run), "--out", str(tmp_path / "all"), "--include-contaminated"]) == 0
    assert selected_count(tmp_path / "all") == 5
    assert main(["select", str(run), "--uids-only", "--out", str(tmp_path / "u.parquet")]) == 0
    assert pq.read_table(tmp_path / "u.parquet").num_rows == 3
    capsys.readouterr()
    assert main(["query", str(run), "SELECT count(DISTINCT eval_id) AS n FROM decontamination"]) == 0
    assert "2" in capsys.readouterr().out
    # radius 0: only the pairs with identical hashes; a re-run replaces the table
    exact = sorted(m["eval_id"] for m in matches if m["distance"] == 0)
    assert main(["decontaminate", str(run), "--against", str(folder), str(tar_path), "--radius", "0"]) == 0
    again = pq.read_table(run / "decontamination" / "matches.parquet").column("eval_id").to_pylist()
    assert sorted(again) == exact


def test_decontaminate_refusals_are_one_line(tmp_path, capsys):
    run = make_run(tmp_path, stages="  - image_size: {}\n")
    folder, _ = eval_sets(tmp_path)
    assert main(["decontaminate", str(run), "--against", str(folder)]) == 2
    assert "has no phash column: add the phash stage" in capsys.readouterr().err
    assert main(["decontaminate", str(run), "--against", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["decontaminate", str(run), "--against", str(folder), "--radius", "40"]) == 2
    assert "--radius" in capsys.readouterr().err


def test_eval_set_on_s3(tmp_path, bucket, capsys):
    from curation.core.storage import open_store

    run = make_run(tmp_path)
    store = open_store(f"s3://{bucket}/eval")
    store.put_bytes("astro.jpg", jpeg(POOL["astronaut"], (256, 256), 75))
    store.put_bytes("notes.md", b"not an image")
    assert main(["decontaminate", str(run), "--against", f"s3://{bucket}/eval/"]) == 0
    matches = pq.read_table(run / "decontamination" / "matches.parquet").to_pylist()
    assert [(Path(m["pool_image_path"]).stem, m["eval_id"]) for m in matches] == [("astronaut", "astro.jpg")]


def tiny_checkpoint(path: Path, seed: int) -> Path:
    import torch

    from curation.models.clip import build_model

    torch.manual_seed(seed)
    built = build_model("curate-tiny")
    torch.save({"model_name": "curate-tiny", "state_dict": built.model.state_dict()}, path)
    return path


def test_embedding_match_with_the_runs_own_checkpoint(tmp_path, capsys):
    from curation.decontaminate import match_embeddings

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", 0)
    run = make_run(
        tmp_path,
        stages=f"  - phash: {{}}\n  - clip_score: {{checkpoint: {ckpt}, device: cpu, keep_embedding: true}}\n",
    )
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "coffee_copy.jpg").write_bytes((tmp_path / "pool" / "coffee.jpg").read_bytes())
    (folder / "flipped.jpg").write_bytes(jpeg(POOL["rocket"][:, ::-1]))  # a mirror: pHash misses it
    threshold = "0.999"
    args = [
        "decontaminate",
        str(run),
        "--against",
        str(folder),
        "--embedding-checkpoint",
        str(ckpt),
        "--embedding-model",
        "curate-tiny",
    ]
    assert main([*args, "--min-cosine", threshold]) == 0
    got = pq.read_table(run / "decontamination" / "matches.parquet").to_pylist()
    by_kind = {(m["kind"], Path(m["pool_image_path"]).stem, m["eval_id"]) for m in got}
    assert ("phash", "coffee", "coffee_copy.jpg") in by_kind
    assert ("embedding", "coffee", "coffee_copy.jpg") in by_kind
    # the embedding matches are exactly the pairs a brute-force cosine over the stored embeddings finds
    rows = pq.read_table(run / "manifests").to_pylist()
    pool = np.array([r["clip_image_embedding"] for r in rows], np.float32)
    from curation.stages.clip_score import ClipScoreParams, ClipScorer

    scorer = ClipScorer(ClipScoreParams(checkpoint=str(ckpt)), "cpu", "fp32")
    ids = sorted(p.name for p in folder.iterdir())
    evals = scorer.encode_images([(folder / i).read_bytes() for i in ids])[0].numpy()
    cos = pool @ evals.T
    want = {(Path(rows[p]["image_path"]).stem, ids[e]) for p, e in zip(*np.nonzero(cos >= float(threshold)))}
    assert {(s, e) for k, s, e in by_kind if k == "embedding"} == want
    pi, ei, c = match_embeddings(pool, evals, float(threshold), block=2)  # blocks of 2 rows: same pairs
    assert {(Path(rows[p]["image_path"]).stem, ids[e]) for p, e in zip(pi, ei)} == want
    assert np.allclose(c, cos[pi, ei])
    # another model's embeddings are not comparable: refused
    other = tiny_checkpoint(tmp_path / "other.pt", 1)
    assert (
        main(["decontaminate", str(run), "--against", str(folder), "--embedding-checkpoint", str(other)]) == 2
    )
    assert "is not the checkpoint whose embeddings" in capsys.readouterr().err
