"""The clip-art benchmark's data: the builder on the committed subset, its split, its server."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from curation.core.imageio import open_image
from curation.core.phash import hamming, phash_image
from tests.helpers import REPO
from train import clipart


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("clipart")
    # max_author_share 0.25: on 41 drawings, the default 2% would let only one-drawing authors be held out
    result = clipart.build(out, clipart.SUBSET, test_fraction=0.3, min_class_size=4, max_author_share=0.25)
    return out, result


def test_pool_and_test_tables_in_laion_shape(built):
    out, result = built
    pool = pq.read_table(out / "pool.parquet")
    test = pq.read_table(out / "test.parquet")
    assert {"URL", "TEXT", "source", "sha256"} <= set(pool.column_names)
    assert {"path", "label", "class", "split", "sha256"} <= set(test.column_names)
    assert pool.num_rows == result.pool > 20 and test.num_rows == result.test > 5
    assert set(pool.column("source").to_pylist()) == {"openclipart", "tuxpaint"}
    classes = json.loads((out / "build.json").read_text())["classes"]
    t = test.to_pydict()
    # Labels are the category folders' classes, not words of the captions.
    assert all(classes[label] == name for label, name in zip(t["label"], t["class"]))
    assert set(t["split"]) == {"test", "shots"}
    captions = [d.caption for d in clipart.drawings(clipart.SUBSET)]
    assert "A shrimp." in captions  # tuxpaint's English line
    assert "Dog 03 Drawn With Straight Lines" in captions  # an SVG's dc:title
    # Every URL points at the default port and names a copied image whose bytes have that sha256.
    for url, sha in zip(pool.column("URL").to_pylist(), pool.column("sha256").to_pylist()):
        assert url.startswith(clipart.URL_PREFIX) and sha in url
        assert (out / url.removeprefix(clipart.URL_PREFIX)).is_file()


def test_split_keeps_test_authors_captions_and_near_copies_out_of_the_pool(built):
    out, result = built
    pool = pq.read_table(out / "pool.parquet").to_pydict()
    test = pq.read_table(out / "test.parquet").to_pydict()

    def phash(rel: str) -> int:
        return phash_image(open_image((out / rel).read_bytes()))

    # Measured again from the images and captions, not from the columns the builder wrote.
    test_hashes = np.array([phash(p) for p in test["path"]], np.int64)
    pool_hashes = np.array([phash(u.removeprefix(clipart.URL_PREFIX)) for u in pool["URL"]], np.int64)
    assert hamming(pool_hashes[:, None], test_hashes[None, :]).min() > 10
    assert not set(pool["sha256"]) & set(test["sha256"])
    assert not set(pool["author"]) & set(test["author"])
    normal = {clipart.normalise_caption(c) for c in test["TEXT"]}
    assert not [c for c in pool["TEXT"] if clipart.normalise_caption(c) in normal]
    assert result.counts["split_check"] == {
        "test_authors_in_pool": 0,
        "test_captions_in_pool": 0,
        "test_images_in_pool": 0,
        "min_phash_distance_pool_to_test": int(hamming(pool_hashes[:, None], test_hashes[None, :]).min()),
        "radius": 10,
        "pool_images_within_radius": 0,
    }
    # Several test authors, and every one of the author's drawings left the pool: the subset's stars
    # are one author's series.
    assert len(set(test["author"])) >= 3
    assert result.counts["test_authors"] == len(set(test["author"]))
    # Authors come from the SVGs' dc:creator (tuxpaint: the stamp's folder).
    assert any(a.startswith("tuxpaint:") for a in pool["author"] + test["author"])
    assert not any(a.startswith("unknown:") for a in pool["author"] + test["author"])


def test_caption_normalisation_ignores_case_whitespace_punctuation():
    assert clipart.normalise_caption("Lemon SVG theme.") == clipart.normalise_caption("  lemon svg-THEME ")
    assert clipart.normalise_caption("Red apple") != clipart.normalise_caption("Red apples")


def test_check_split_refuses_a_leak(built, tmp_path):
    import shutil

    import pyarrow as pa

    out, _ = built
    copy = tmp_path / "leaky"
    copy.mkdir()
    for name in ("pool.parquet", "test.parquet"):
        shutil.copy(out / name, copy / name)
    assert clipart.check_split(copy, 10)["test_captions_in_pool"] == 0
    pool = pq.read_table(copy / "pool.parquet")
    test = pq.read_table(copy / "test.parquet").to_pydict()
    # One pool caption becomes a test caption with other case and punctuation.
    texts = pool.column("TEXT").to_pylist()
    texts[0] = "  " + test["TEXT"][0].upper() + "!!"
    pq.write_table(
        pool.set_column(pool.schema.get_field_index("TEXT"), "TEXT", pa.array(texts)), copy / "pool.parquet"
    )
    with pytest.raises(clipart.SplitLeak, match="test_captions_in_pool': 1"):
        clipart.check_split(copy, 10)


def test_build_from_a_hostile_folder(tmp_path):
    """Issue 28 (11): a FIFO named *.png, a link to /dev/zero, links out of the folder (a file and a
    folder), and an SVG of unclosed `<cc:Work ` openings: refused or read in linear time, never a hang."""
    import os
    import shutil

    root = tmp_path / "root"
    shutil.copytree(clipart.SUBSET, root, symlinks=True)
    png = root / "openclipart" / "png" / "food"
    outside = tmp_path / "outside"
    (outside / "png").mkdir(parents=True)
    secret = next(png.rglob("*.png"))
    shutil.copy(secret, outside / "png" / "secret.png")
    (outside / "png" / "secret.txt").write_text("SECRET caption\n")
    os.mkfifo(png / "fifo.png")
    os.symlink("/dev/zero", png / "zero.png")
    os.symlink(outside / "png" / "secret.png", png / "secret.png")
    os.symlink(outside / "png", root / "tuxpaint" / "stamps" / "linked")  # a folder out: not entered
    (root / "tuxpaint" / "stamps" / "food" / "leak.txt").symlink_to(outside / "png" / "secret.txt")
    shutil.copy(secret, root / "tuxpaint" / "stamps" / "food" / "leak.png")
    # 1 MB of unclosed openings: the old regular expressions took ~20 minutes on this.
    bomb = "<svg><metadata>" + "<cc:Work " * 110_000
    shutil.copy(secret, png / "bomb.png")
    (root / "openclipart" / "svg" / "food" / "bomb.svg").write_text(bomb)
    assert clipart.svg_metadata(bomb) == ("", "", [])
    assert clipart.svg_author(bomb) == ""
    done = subprocess.run(
        [sys.executable, "-m", "train.clipart", "build", str(tmp_path / "o"), "--from", str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a timing: the FIFO and /dev/zero would block or fill memory
    )
    assert done.returncode == 0, done.stderr[-2000:]
    counts = json.loads((tmp_path / "o" / "build.json").read_text())
    assert counts["openclipart_refused_not_a_file"] == 1  # the FIFO
    assert counts["openclipart_refused_outside_folder"] == 2  # /dev/zero and secret.png
    assert counts["tuxpaint_refused_outside_folder"] == 1  # leak.txt
    pool = pq.read_table(tmp_path / "o" / "pool.parquet").to_pydict()
    assert not [c for c in pool["TEXT"] if "SECRET" in c]


def test_svg_metadata_reads_the_work_not_the_agents():
    svg = (
        "<svg><metadata><cc:Work><dc:title>Red &amp; flower</dc:title><dc:description>  five\n petals"
        "</dc:description><dc:subject><rdf:Bag><rdf:li>plant</rdf:li><rdf:li></rdf:li></rdf:Bag></dc:subject>"
        "<dc:creator><cc:Agent><dc:title>Someone</dc:title></cc:Agent></dc:creator></cc:Work></metadata></svg>"
    )
    assert clipart.svg_metadata(svg) == ("Red & flower", "five petals", ["plant"])
    assert clipart.svg_metadata("<svg/>") == ("", "", [])
    assert clipart.caption_of("Red flower", "Red flower") == "Red flower"
    assert clipart.caption_of("Red flower.", "Five petals") == "Red flower. Five petals"
    assert clipart.caption_of("Red flower", "Five petals") == "Red flower. Five petals"


def test_served_urls_fetch_the_images(built, tmp_path):
    out, _ = built
    with clipart.serve(out) as base:
        pool = pq.read_table(clipart.pool_for(out, base, tmp_path / "pool.parquet")).to_pydict()
        url = pool["URL"][0]
        assert url.startswith(base) and base != clipart.URL_PREFIX
        with urllib.request.urlopen(url, timeout=10) as r:
            data = r.read()
    import hashlib

    assert hashlib.sha256(data).hexdigest() == pool["sha256"][0]


def test_missing_packages_say_what_to_install(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "train.clipart", "build", str(tmp_path / "o"), "--from", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "apt-get install openclipart-png openclipart-svg tuxpaint-stamps-default" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_benchmark_small_form_end_to_end(tmp_path):
    """bench/clipart_benchmark.py --small on the committed subset: every phase, through the real pipeline,
    server, select, train (the locked ImageNet tower, samples seen = |all|) and eval (clip art and emoji);
    the declared comparisons get a paired interval and a verdict; a second invocation resumes."""
    out = tmp_path / "bench"
    argv = [
        sys.executable,
        "bench/clipart_benchmark.py",
        "--small",
        "--from",
        str(clipart.SUBSET),
        "--out",
        str(out),
        "--arms",
        "all",
        "cat",
        "balance",
        "--seeds",
        "0",
        "1",
        "--base-seeds",
        "0",
        "--samples-seen",
        "1",
        "--emoji-limit",
        "60",
        "--throughput-images",
        "4",
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    pool_rows = pq.read_table(out / "data" / "pool.parquet").num_rows
    assert results["pipeline"]["rows"] == pool_rows
    assert results["pipeline"]["download_status"] == {"success": pool_rows}
    all_samples = results["select"]["all"]["samples"]
    assert all_samples == pool_rows
    cat = results["select"]["cat"]["samples"]
    assert 0 < cat < pool_rows
    assert results["build"]["split_check"]["test_authors_in_pool"] == 0
    # --views 4 (the default) with the locked tower: every run read the trunk's features from one cache.
    assert torch.load(out / "trunk_cache.pt", weights_only=True)["features"].shape[:2] == (all_samples, 4)
    runs = results["eval"]["runs"]  # this invocation's eval phase (one process, both seeds)
    expected = {
        f"x1/{cell}__s{seed}"
        for cell in (
            "all__infonce",
            "cat__infonce",
            "cat_random__infonce",
            "balance__infonce",
            "all__hn_nce",
            "all__helip",
            "all__infonce_continued",
        )
        for seed in (0, 1)
    }
    assert set(runs) == expected
    assert all(0 <= r["emoji_retrieval_R@1"] <= 1 and 0 <= r["zero_shot_top1"] <= 1 for r in runs.values())
    assert (
        "few_shot" in runs["x1/cat_random__infonce__s0"] and "few_shot" not in runs["x1/balance__infonce__s0"]
    )
    # The random control has the size of its filter, a new draw per seed.
    for seed in (0, 1):
        sizes = json.loads((out / "subsets" / f"cat_random_s{seed}" / "sizes.json").read_text())
        assert sum(sizes.values()) == cat
    assert (out / "subsets" / "cat_random_s0" / "00000.tar").read_bytes() != (
        out / "subsets" / "cat_random_s1" / "00000.tar"
    ).read_bytes()
    table = results["table"]
    cmp = table["comparisons"]["x1"]["cat / infonce vs cat_random / infonce"]
    assert cmp["seeds"] == [0, 1]
    lo, hi = cmp["retrieval_R@1"]["ci95"]
    assert lo <= cmp["retrieval_R@1"]["mean"] <= hi
    assert cmp["retrieval_R@1"]["verdict"] in ("higher, shown", "lower, shown", "not shown")
    md = (out / "results.md").read_text()
    assert "CAT vs a random subset of its size" in md and "| all / helip |" in md
    # Resume: the cached phases do not run again and every run is found finished.
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for phase in ("build", "pipeline", "throughput"):
        assert f"] {phase} ..." not in again.stdout
    assert (out / "results.md").read_text() == md


def test_benchmark_without_packages_says_what_to_install(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "bench/clipart_benchmark.py",
            "--small",
            "--from",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "apt-get install openclipart-png" in done.stderr


def test_emoji_set_renders_cldr_names_and_shares_nouns_with_the_pool(tmp_path):
    """The second evaluation set (Debian fonts-noto-color-emoji + unicode-cldr-core, `make emoji`):
    rendered emoji captioned with their CLDR English name; zero-shot classes are name heads that the
    pool's captions use."""
    names = clipart.cldr_names()
    assert names["🍎"] == "red apple" and names["🐕"] == "dog"
    # Every CLDR name as a pool caption, the first half twice: heads of names are classes when the pool
    # uses them at least twice.
    half = list(names.values())[: len(names) // 2]
    pool = [*names.values(), *half]
    info = clipart.build_emoji(tmp_path, pool, np.zeros(0, np.int64), min_pool_captions=2, limit=300)
    table = pq.read_table(tmp_path / "emoji.parquet").to_pydict()
    assert info["images"] == len(table["path"]) == 300
    assert info["no_glyph"] > 0  # CLDR names text symbols the colour font does not draw
    assert info["labelled"] >= 30
    assert min(info["pool_captions_per_class"].values()) >= 2
    for path, label, cls, text in zip(table["path"], table["label"], table["class"], table["TEXT"]):
        image = open_image((tmp_path / path).read_bytes())
        assert image.size == (136, 128)
        assert (label >= 0) == (cls is not None) and (cls is None or text.split()[-1] == cls)
    assert len(set(table["TEXT"])) == len(table["TEXT"])
