"""Images end to end: img2dataset downloads from a real HTTP server on 127.0.0.1, webdataset and
image-folder inputs, and `curate select` output read back by the webdataset library."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main
from curation.config import ConfigError
from curation.schema import make_uid
from curation.stages.base import StageContext, apply_stage
from curation.stages.download import Download, DownloadParams
from curation.validation import parse_checked_config
from tests.helpers import REPO, kill_run_at_hanging_url
from tests.imageserver import ImageServer, jpeg

# The test server listens on 127.0.0.1: downloads from it must opt in (the default refuses loopback).
LOOPBACK = "127.0.0.1/32"
GOOD = "A man rides a red bicycle down the street."  # passes both caption filters
SHORT = "dog"  # dropped by caption_complexity: its url must never be requested

# path on the test server -> (status, drop_reason)
CASES = {
    "/img/a.jpg": ("success", None),
    "/png/alpha.png": ("success", None),
    "/404/b.jpg": ("failed_to_download", "download"),
    "/slow/c.jpg": ("success", None),
    "/hang/d.jpg": ("failed_to_download", "download"),
    "/garbage/e.jpg": ("failed_to_resize", "decode"),
    "/truncated/f.jpg": ("failed_to_resize", "decode"),
    "/redirect/g.jpg": ("success", None),
    "/img/h.jpg": ("success", None),
    "/img/i.jpg": ("success", None),
}
DROPPED = ["/img/short1.jpg", "/img/short2.jpg", "/img/short3.jpg"]


def pairs_table(server: ImageServer) -> pa.Table:
    paths = list(CASES) + DROPPED
    # interleave so every shard holds kept and caption-dropped rows
    order = [paths[i] for i in np.argsort([i % 4 for i in range(len(paths))], kind="stable")]
    return pa.table(
        {
            "url": [server.url(p) for p in order],
            "caption": [SHORT if p in DROPPED else GOOD for p in order],
            "source": [f"row {i}" for i in range(len(order))],
        }
    )


def write_download_config(
    path: Path, input_path: Path, output: Path, rows: int = 5, timeout: int = 1
) -> Path:
    path.write_text(
        f"""input: {{format: parquet, path: {input_path}, rows_per_shard: {rows}}}
output: {output}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_complexity: {{min: 2}}
  - caption_action: {{min: 1}}
  - download: {{timeout: {timeout}, thread_count: 16, allow_private_addresses: [{LOOPBACK}]}}
"""
    )
    return path


def manifest(out: Path) -> pa.Table:
    return pq.read_table(out / "manifests")


def tar_member(path: Path, key: str, ext: str = "jpg") -> bytes:
    with tarfile.open(path) as tar:
        f = tar.extractfile(f"{key}.{ext}")
        assert f is not None
        return f.read()


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """One caption + download run over every server case (shared: tests must not modify it)."""
    tmp = tmp_path_factory.mktemp("dl")
    with ImageServer() as server:
        pq.write_table(pairs_table(server), tmp / "pairs.parquet")
        cfg = write_download_config(tmp / "c.yaml", tmp / "pairs.parquet", tmp / "out")
        assert main(["run", str(cfg)]) == 0
        yield tmp / "out", server


# ---------------------------------------------------------------------------- download


def test_every_row_is_in_the_manifest_with_img2dataset_status_and_drop_reason(downloaded):
    out, server = downloaded
    rows = {r["url"].split(str(server.port), 1)[1]: r for r in manifest(out).to_pylist()}
    assert len(rows) == len(CASES) + len(DROPPED)
    for path, (status, reason) in CASES.items():
        r = rows[path]
        assert (r["status"], r["drop_reason"], r["keep"]) == (status, reason, reason is None), path
        assert (r["image_path"] is not None) == (status == "success"), path
        assert r["key"] is not None  # img2dataset keys every requested sample
        assert r["source"] is not None  # input columns are carried
    assert "404" in rows["/404/b.jpg"]["error_message"]
    assert "timed out" in rows["/hang/d.jpg"]["error_message"]
    for path in DROPPED:  # rows not downloaded keep their earlier drop_reason, with null download columns
        r = rows[path]
        assert (r["drop_reason"], r["status"], r["key"], r["image_path"]) == ("complexity", None, None, None)
    # resize settings: img2dataset's defaults (256px, border) over the recorded original size
    a = rows["/img/a.jpg"]
    assert (a["width"], a["height"], a["original_width"], a["original_height"]) == (256, 256, 64, 48)
    png = rows["/png/alpha.png"]
    assert (png["original_width"], png["original_height"]) == (40, 30)


def test_downloaded_images_are_in_tars_under_the_output_with_their_hash(downloaded):
    out, _ = downloaded
    ok = [r for r in manifest(out).to_pylist() if r["status"] == "success"]
    for r in ok:
        tar = out / r["image_path"]
        assert tar.is_relative_to(out / "images" / f"shard-{r['shard']:05d}")
        data = tar_member(tar, r["key"])
        assert Image.open(io.BytesIO(data)).size == (256, 256)
        meta = json.loads(tar_member(tar, r["key"], "json"))
        assert meta["uid"] == r["uid"]  # img2dataset's own record carries our uid
    a = next(r for r in ok if r["url"].endswith("/img/a.jpg"))
    assert a["sha256"] == hashlib.sha256(jpeg("/img/a.jpg")).hexdigest()  # of the bytes served
    # img2dataset's per-batch Parquet and stats sit next to each tar; nothing half-written is left
    for tar in (out / "images").rglob("*.tar"):
        assert tar.with_suffix(".parquet").exists()
        assert tar.with_name(tar.stem + "_stats.json").exists()
    assert not list((out / "images").rglob(".tmp-*"))


def test_cascade_requests_only_rows_the_caption_filters_kept_and_follows_redirects(downloaded):
    _, server = downloaded
    for path in DROPPED:
        assert server.hits[path] == 0
    for path in CASES:
        assert server.hits[path] == 1, path
    assert server.hits["/img/g.jpg"] == 1  # the redirect target


def test_download_hands_image_bytes_to_the_next_stage(tmp_path, image_server):
    params = DownloadParams(timeout=1, thread_count=4, allow_private_addresses=[LOOPBACK])
    stage = Download(params, StageContext(output_dir=tmp_path))
    urls = [image_server.url(p) for p in ("/img/x.jpg", "/404/y.jpg", "/img/skipped.jpg")]
    table = pa.table(
        {
            "uid": [make_uid(u, GOOD) for u in urls],
            "shard": pa.array([7, 7, 7], pa.int32()),
            "url": urls,
            "caption": [GOOD] * 3,
            "keep": [True, True, False],
            "drop_reason": [None, None, "complexity"],
        }
    )
    result = apply_stage(stage, table)
    image = result.column("image").to_pylist()
    assert image[0] == tar_member(
        tmp_path / result.column("image_path")[0].as_py(), result.column("key")[0].as_py()
    )
    assert Image.open(io.BytesIO(image[0])).format == "JPEG"
    assert image[1] is None and image[2] is None
    assert result.column("drop_reason").to_pylist() == [None, "download", "complexity"]
    assert result.schema.field("image").type == pa.binary()
    assert image_server.hits["/img/skipped.jpg"] == 0


def test_rerun_redownloads_only_the_unfinished_shard_and_starts_its_images_clean(tmp_path, image_server):
    pq.write_table(pairs_table(image_server), tmp_path / "pairs.parquet")
    cfg = write_download_config(tmp_path / "c.yaml", tmp_path / "pairs.parquet", tmp_path / "out")
    out = tmp_path / "out"
    assert main(["run", str(cfg)]) == 0
    first = manifest(out).to_pylist()
    # Shard 1 "did not finish": no manifest, no ledger entry, a half-written tar and a stray temp dir.
    (out / "manifests" / "shard-00001.parquet").unlink()
    (out / "ledger" / "shard-00001.json").unlink()
    batch = next((out / "images" / "shard-00001").iterdir())
    (batch / "00000.tar").write_bytes((batch / "00000.tar").read_bytes()[:700])
    (out / "images" / "shard-00001" / f".tmp-{batch.name}").mkdir()
    hits = dict(image_server.hits)

    assert main(["run", str(cfg)]) == 0
    again = {r["uid"]: r for r in manifest(out).to_pylist()}
    for r in first:
        path = r["url"].split(str(image_server.port), 1)[1]
        requested_before = hits.get(path, 0)
        if r["shard"] == 1 and r["status"] is not None:
            assert image_server.hits[path] == requested_before + 1, path
        else:
            assert image_server.hits[path] == requested_before, path  # finished shards: no re-download
        assert again[r["uid"]]["status"] == r["status"]
    assert [p.name for p in (out / "images" / "shard-00001").iterdir()] == [batch.name]
    for r in again.values():
        if r["shard"] == 1 and r["image_path"]:
            Image.open(io.BytesIO(tar_member(out / r["image_path"], r["key"]))).verify()


@pytest.mark.slow
def test_sigkill_during_a_download_then_resume(tmp_path):
    with ImageServer(hang_seconds=60) as server:
        paths = (
            [f"/img/k{i}.jpg" for i in range(8)] + ["/hang/k8.jpg"] + [f"/img/k{i}.jpg" for i in range(9, 12)]
        )
        pq.write_table(
            pa.table({"url": [server.url(p) for p in paths], "caption": [GOOD] * 12}), tmp_path / "p.parquet"
        )
        out = tmp_path / "out"
        cfg = write_download_config(tmp_path / "c.yaml", tmp_path / "p.parquet", out, rows=4, timeout=30)
        kill_run_at_hanging_url(cfg, server.hanging)
        assert sorted(p.name for p in (out / "ledger").glob("shard-*.json")) == [
            "shard-00000.json",
            "shard-00001.json",
        ]
        assert not (out / "images" / "shard-00002").exists() or not any(
            p.name.endswith(".tar")
            for p in (out / "images" / "shard-00002").rglob("*")
            if ".tmp-" not in str(p)
        )
        server.release.set()
        before = dict(server.hits)

        assert main(["run", str(cfg)]) == 0
        for i in range(8):  # shards 0 and 1 were finished: not downloaded again
            assert server.hits[f"/img/k{i}.jpg"] == before[f"/img/k{i}.jpg"] == 1
        assert server.hits["/hang/k8.jpg"] == 2
        t = manifest(out)
        assert t.num_rows == 12 and t.column("status").to_pylist() == ["success"] * 12
        assert not list((out / "images").rglob(".tmp-*"))


# ---------------------------------------------------------------------------- select


def test_select_writes_shards_that_webdataset_reads_with_sizes(downloaded, tmp_path, capsys):
    import webdataset as wds

    out, _ = downloaded
    sel = tmp_path / "sel"
    assert main(["select", str(out), "--out", str(sel), "--shard-size", "2"]) == 0
    kept = {r["uid"]: r for r in manifest(out).to_pylist() if r["keep"]}
    sizes = json.loads((sel / "sizes.json").read_text())
    assert list(sizes) == [f"{i:05d}.tar" for i in range(len(sizes))]
    assert sum(sizes.values()) == len(kept) == 6 and list(sizes.values()) == [2, 2, 2]
    samples = list(
        wds.WebDataset([str(sel / n) for n in sizes], shardshuffle=False, empty_check=False)
        .decode("pil")
        .to_tuple("__key__", "jpg;png;webp", "txt", "json")
    )
    assert len(samples) == 6 and len({s[0] for s in samples}) == 6
    for key, image, text, meta in samples:
        assert image.size == (256, 256)
        assert meta["key"] == key and meta["uid"] in kept
        assert text == kept[meta["uid"]]["caption"]
        assert meta["caption_complexity"] == kept[meta["uid"]]["caption_complexity"]
    assert "wrote 6 samples in 3 shard(s)" in capsys.readouterr().out


def test_select_where_and_uids_only(downloaded, tmp_path):
    out, _ = downloaded
    f = tmp_path / "subset.parquet"
    where = "status LIKE 'failed%' OR drop_reason = 'complexity'"
    assert main(["select", str(out), "--where", where, "--out", str(f), "--uids-only"]) == 0
    want = duckdb.sql(f"SELECT uid FROM read_parquet('{out}/manifests/*.parquet') WHERE {where}").fetchall()
    assert sorted(pq.read_table(f).column("uid").to_pylist()) == sorted(u for (u,) in want)
    # rows without images (failed or never downloaded) cannot be shards: left out, and said so
    sel = tmp_path / "sel"
    assert main(["select", str(out), "--where", where, "--out", str(sel)]) == 0
    assert json.loads((sel / "sizes.json").read_text()) == {}


def test_select_refuses_bad_input_without_writing(downloaded, tmp_path, capsys):
    out, _ = downloaded
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    assert main(["select", str(out), "--out", str(taken)]) == 2
    assert main(["select", str(out), "--where", "no_such_column > 1", "--out", str(tmp_path / "s")]) == 2
    assert main(["select", str(out), "--out", str(tmp_path / "u.csv"), "--uids-only"]) == 2
    assert main(["select", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists() and (taken / "x").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    err = capsys.readouterr().err
    assert "is not empty" in err and "no_such_column" in err


def test_select_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["select", "--help"])
    assert e.value.code == 0
    assert "--uids-only" in capsys.readouterr().out


# ---------------------------------------------------------------------------- inputs with images


def caption_config(path: Path, fmt: str, input_path: Path | str, output: Path) -> Path:
    path.write_text(
        f"""input: {{format: {fmt}, path: "{input_path}", rows_per_shard: 4}}
output: {output}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_complexity: {{min: 2}}
  - caption_action: {{min: 1}}
"""
    )
    return path


def test_webdataset_input_of_img2dataset_tars_keeps_uids_and_selects(downloaded, tmp_path):
    out, _ = downloaded
    first = {r["uid"]: r for r in manifest(out).to_pylist() if r["status"] == "success"}
    cfg = caption_config(tmp_path / "c.yaml", "webdataset", f"{out}/images/shard-*/*/*.tar", tmp_path / "wds")
    assert main(["run", str(cfg)]) == 0
    t = manifest(tmp_path / "wds").to_pylist()
    # img2dataset's tars hold url + caption, so the samples keep the uids of the download run
    assert {r["uid"] for r in t} == set(first)
    for r in t:
        assert Path(r["image_path"]).is_absolute() and r["key"] == first[r["uid"]]["key"]
    sel = tmp_path / "sel"
    assert main(["select", str(tmp_path / "wds"), "--out", str(sel)]) == 0
    assert sum(json.loads((sel / "sizes.json").read_text()).values()) == len(first)


def test_webdataset_input_without_json_png_and_a_sample_without_image(tmp_path):
    tar_path = tmp_path / "in" / "part-0.tar"
    tar_path.parent.mkdir()
    png = io.BytesIO()
    Image.new("RGBA", (9, 7), (0, 255, 0, 100)).save(png, format="PNG")
    members = [
        ("s1.png", png.getvalue()),
        ("s1.txt", GOOD.encode()),
        ("dir/s2.jpg", jpeg("s2")),
        ("dir/s2.txt", b"A woman reads a long book in the park."),
        ("s3.txt", b"A cat without its picture sleeps on the mat."),
    ]
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = caption_config(tmp_path / "c.yaml", "webdataset", tar_path, tmp_path / "out")
    assert main(["run", str(cfg)]) == 0
    t = {r["key"]: r for r in manifest(tmp_path / "out").to_pylist()}
    assert list(t) == ["s1", "dir/s2", "s3"]
    assert t["s1"]["url"] == f"{tar_path}#s1"
    assert t["s1"]["uid"] == make_uid(f"{tar_path}#s1", GOOD)
    assert t["s3"]["image_path"] is None
    assert t["s3"]["keep"]  # kept by the caption filters, but it has no image to select
    sel = tmp_path / "sel"
    assert main(["select", str(tmp_path / "out"), "--out", str(sel)]) == 0
    assert json.loads((sel / "sizes.json").read_text()) == {"00000.tar": 2}
    with tarfile.open(sel / "00000.tar") as tar:
        assert sorted(n.rsplit(".", 1)[1] for n in tar.getnames()) == [
            "jpg",
            "json",
            "json",
            "png",
            "txt",
            "txt",
        ]


def test_image_folder_input_and_select_converts_other_formats(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 10), (200, 10, 10)).save(folder / "a.jpg")
    (folder / "a.txt").write_text(GOOD + "\n")
    Image.new("RGB", (12, 12), (10, 10, 200)).save(folder / "sub" / "b.bmp")
    (folder / "sub" / "b.txt").write_text("A boy throws a ball to his dog.")
    Image.new("RGBA", (5, 5)).save(folder / "sub" / "c.png")  # no caption: kept in the manifest, dropped
    (folder / "notes.md").write_text("not an image")
    cfg = caption_config(tmp_path / "c.yaml", "image_folder", folder, tmp_path / "out")
    assert main(["run", str(cfg)]) == 0
    t = {Path(r["url"]).name: r for r in manifest(tmp_path / "out").to_pylist()}
    assert sorted(t) == ["a.jpg", "b.bmp", "c.png"]
    assert t["a.jpg"]["url"] == t["a.jpg"]["image_path"] == str(folder / "a.jpg")
    assert t["a.jpg"]["caption"] == GOOD and t["c.png"]["caption"] is None
    assert (t["a.jpg"]["keep"], t["b.bmp"]["keep"], t["c.png"]["drop_reason"]) == (True, True, "complexity")
    sel = tmp_path / "sel"
    assert main(["select", str(tmp_path / "out"), "--out", str(sel)]) == 0
    with tarfile.open(sel / "00000.tar") as tar:
        names = sorted(tar.getnames())
        exts = sorted(n.split(".", 1)[1] for n in names if not n.endswith((".txt", ".json")))
        assert exts == ["jpg", "png"]  # the BMP became a PNG: open_clip reads jpg/png/webp
        bmp_key = next(n for n in names if n.endswith(".png")).split(".")[0]
        img = Image.open(io.BytesIO(tar.extractfile(f"{bmp_key}.png").read()))
        assert img.size == (12, 12) and img.getpixel((0, 0)) == (10, 10, 200)


# ---------------------------------------------------------------------------- config


def test_download_config_problems_are_reported(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(ConfigError) as e:
        parse_checked_config(
            f"""input: {{format: image_folder, path: {tmp_path}}}
output: {tmp_path / "out"}
stages:
  - download: {{timeout: 0, encode_format: png, encode_quality: 95}}
"""
        )
    msg = str(e.value)
    assert "image_folder input already has its images" in msg
    assert "download.timeout (line 4): must be >= 1, got 0" in msg and "0..9" in msg
    with pytest.raises(ConfigError) as e:
        parse_checked_config(
            f"""input: {{format: parquet, path: {REPO / "data" / "laion_captions_1k.parquet"}, url_column: URL,
  caption_column: TEXT}}
output: {tmp_path / "out"}
stages:
  - download: {{resize_mode: squash, max_image_area: lots}}
"""
        )
    assert "resize_mode" in str(e.value) and "max_image_area" in str(e.value)


def test_demo_image_pipeline_is_valid_and_its_bundled_pairs_exist(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)  # the demo's paths are relative to the repository root
    # a fresh output: runs/demo_images may hold a developer's earlier demo run
    assert main(["validate", "pipelines/demo_images.yaml", "--output", str(tmp_path / "out")]) == 0
    pairs = pq.read_table(REPO / "data" / "demo_pairs.parquet").to_pylist()
    present = [p for p in pairs if (REPO / p["url"].removeprefix("file:")).exists()]
    assert len(pairs) - len(present) == 1  # one deliberately missing file


@pytest.mark.slow
def test_img2dataset_processes_and_runner_workers_give_the_same_manifest(tmp_path, image_server):
    """processes_count > 1 goes through img2dataset's multiprocessing distributor, inside runner workers."""
    pq.write_table(pairs_table(image_server), tmp_path / "pairs.parquet")
    results = []
    for name, workers, processes in (("one", 1, 1), ("many", 2, 2)):
        cfg = write_download_config(tmp_path / f"{name}.yaml", tmp_path / "pairs.parquet", tmp_path / name)
        text = cfg.read_text().replace("workers: 1", f"workers: {workers}")
        cfg.write_text(text.replace("thread_count: 16", f"thread_count: 16, processes_count: {processes}"))
        assert main(["run", str(cfg)]) == 0
        t = manifest(tmp_path / name).sort_by("uid")
        results.append(t.select(["uid", "status", "drop_reason", "width", "sha256"]))
        if processes == 2:  # a batch of 4 kept rows became 2 img2dataset shards: 2 tars in its directory
            assert any(
                len(list(d.glob("*.tar"))) == 2 for d in (tmp_path / name / "images").glob("shard-*/*")
            )
    assert results[0].equals(results[1])


def test_select_exits_1_listing_images_it_could_not_read_and_writes_the_rest(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "gone.jpg"):
        Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / name)
    (folder / "bad.gif").write_bytes(b"GIF89a but not really")
    for name in ("a", "gone", "bad"):
        (folder / f"{name}.txt").write_text(GOOD)
    cfg = caption_config(tmp_path / "c.yaml", "image_folder", folder, tmp_path / "out")
    assert main(["run", str(cfg)]) == 0
    (folder / "gone.jpg").unlink()
    capsys.readouterr()
    assert main(["select", str(tmp_path / "out"), "--out", str(tmp_path / "sel")]) == 1
    assert json.loads((tmp_path / "sel" / "sizes.json").read_text()) == {"00000.tar": 1}
    err = capsys.readouterr().err
    assert "2 selected images could not be read" in err and "gone.jpg" in err and "bad.gif" in err
