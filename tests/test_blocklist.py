"""Hash blocklists: PDQ against the reference's hashes, and the stage through `curate run` / `select`
with lists the test builds from images it creates: matched images are never written anywhere."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from curation.cli import main
from curation.core.pdq import distances, parse_hex, pdq_hash, pdq_image
from tests.imageserver import ImageServer

LOOPBACK = "127.0.0.1/32"
GOOD = "A man rides a red bicycle down the street."

# Hashes computed by the `pdqhash` package 0.2.8 (PyPI; a wrapper of Meta's C++ reference,
# facebook/ThreatExchange pdq/cpp) on the same arrays: hex of its 256 bits, and its quality.
REFERENCE = {
    "astronaut": ("2d6b1af3a956c529e79ca3d2526fa834d4196c81cedd04de0a26b855fc99b724", 100),
    "chelsea": ("5feb5321f01da156898e2bf629a5d3438412cdbd23f48942464526315db33ffd", 100),
    "noise": ("fd74e77a40d151c6a9da708192a3a284d625aaf6b0c93b79f1f07f861954b307", 100),
    "waves": ("ffd2fa07ffc2e807ffc2e007ffc21007f7420007fd42000755420037aaadfff8", 100),
    "blocks64": (
        "63436bc3943cb6314bce9431943cb631943c943c4bce63438dfc6bc36bc39cbc",
        100,
    ),  # 64 x 64: no filter
}
# Not a vector: a flat gradient (quality 44) has ~200 DCT coefficients within rounding of the median,
# so float32 (the reference) and float64 (here) disagree on half its bits; lists skip quality < 50.


def reference_arrays() -> dict[str, np.ndarray]:
    return {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "noise": np.random.default_rng(0).integers(0, 256, (100, 137, 3), dtype=np.uint8),
        "waves": waves(),
        "blocks64": blocks64(),
    }


def waves() -> np.ndarray:
    y, x = np.mgrid[0:210, 0:333]
    channels = [
        128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0),
        128 + 90 * np.cos((x + y) / 31.0),
        x * 255 / 333,
    ]
    return np.stack(channels, -1).astype(np.uint8)


def blocks64() -> np.ndarray:
    im = np.zeros((64, 64, 3), np.uint8)
    im[10:40, 20:50] = 255
    im[45:60, 5:30] = (200, 30, 90)
    return im


def test_pdq_equals_the_reference_implementation_bit_for_bit():
    for name, array in reference_arrays().items():
        assert pdq_hash(array) == REFERENCE[name], name


def test_pdq_distance_small_for_a_reencoded_copy_and_large_for_another_photo():
    original = pdq_hash(skimage.data.astronaut())[0]
    copy = pdq_image(Image.open(io.BytesIO(jpeg_bytes(skimage.data.astronaut(), (300, 300), 70))))[0]
    other = pdq_hash(skimage.data.chelsea())[0]
    d = distances(parse_hex([original]), parse_hex([copy, other]))[0]
    assert d[0] <= 31 < 64 < d[1]
    assert pdq_hash(np.zeros((4, 40, 3), np.uint8)) == ("0" * 64, 0)  # under 5 px: the reference's refusal


def jpeg_bytes(array: np.ndarray, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    img = Image.fromarray(array)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photos() -> dict[str, bytes]:
    """Real photos (skimage.data) as the server sends them."""
    return {
        "sha": jpeg_bytes(skimage.data.chelsea()),
        "md5": jpeg_bytes(skimage.data.coffee()),
        "pdq": jpeg_bytes(skimage.data.astronaut(), (320, 320), 75),  # the list has the original's PDQ
        "url": jpeg_bytes(skimage.data.rocket()),
        "clean": jpeg_bytes(skimage.data.camera()),
        "clean2": jpeg_bytes(skimage.data.hubble_deep_field()[:300, :300]),
    }


def write_lists(folder: Path, images: dict[str, bytes], url_listed: str) -> dict[str, Path]:
    folder.mkdir()
    lists = {
        "sha256": folder / "partner-sha256.csv",
        "md5": folder / "ncmec-md5.txt",
        "pdq": folder / "threatexchange-pdq.csv",
        "url": folder / "urls.txt",
        "domain": folder / "domains.txt",
    }
    other = hashlib.sha256(b"another image").hexdigest()
    lists["sha256"].write_text(
        f"# partner list\n{other},extra\n{hashlib.sha256(images['sha']).hexdigest()},x\n"
    )
    lists["md5"].write_text(f"{hashlib.md5(images['md5']).hexdigest().upper()}  coffee.jpg\n\n")
    pdq_original, quality = pdq_hash(skimage.data.astronaut())
    lists["pdq"].write_text(f"{pdq_original},{quality}\n")
    lists["url"].write_text(url_listed + "\n")
    lists["domain"].write_text("# hosts\nblocked.example\n")
    return lists


def blocklist_yaml(lists: dict[str, Path], distance: int = 31) -> str:
    entries = ", ".join(f"{kind}: [{path}]" for kind, path in lists.items())
    return f"  - hash_blocklist: {{{entries}, pdq_distance: {distance}}}\n"


def download_config(path: Path, pairs: Path, out: Path | str, stages: str, rows: int = 10) -> Path:
    path.write_text(
        f"""input: {{format: parquet, path: {pairs}, rows_per_shard: {rows}}}
output: {out}
runner: {{type: local, workers: 1, progress: false}}
stages:
{stages}  - download:
      # written as fetched, so a test can look for the fetched bytes in every file
      {{resize_mode: "no", skip_reencode: true, timeout: 5, thread_count: 8, allow_private_addresses: [{LOOPBACK}]}}
"""
    )
    return path


def all_bytes_under(folder: Path) -> bytes:
    """Every file under `folder`, tar members unpacked too (their bytes appear as they are in a tar)."""
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_blocklists_drop_matches_before_any_byte_is_written(tmp_path):
    images = photos()
    with ImageServer() as server:
        for name, data in images.items():
            server.files[f"/p/{name}.jpg"] = data
        urls = {name: server.url(f"/p/{name}.jpg") for name in images}
        urls["domain"] = "http://blocked.example/never.jpg"  # never fetched: not even resolved
        lists = write_lists(tmp_path / "lists", images, urls["url"])
        pq.write_table(
            pa.table({"url": list(urls.values()), "caption": [GOOD] * len(urls), "name": list(urls)}),
            tmp_path / "pairs.parquet",
        )
        out = tmp_path / "out"
        cfg = download_config(tmp_path / "c.yaml", tmp_path / "pairs.parquet", out, blocklist_yaml(lists))
        assert main(["validate", str(cfg)]) == 0
        assert main(["run", str(cfg)]) == 0
        hits = dict(server.hits)
    rows = {r["url"]: r for r in pq.read_table(out / "manifests").to_pylist()}
    by_name = {name: rows[url] for name, url in urls.items()}
    expect = {
        "sha": ("blocklisted", "partner-sha256.csv (sha256)"),
        "md5": ("blocklisted", "ncmec-md5.txt (md5)"),
        "url": (None, None),
        "domain": (None, None),
        "clean": ("success", None),
        "clean2": ("success", None),
    }
    for name, (status, message) in expect.items():
        assert (by_name[name]["status"], by_name[name]["error_message"]) == (status, message), name
    pdq_row = by_name["pdq"]
    assert pdq_row["status"] == "blocklisted"
    assert pdq_row["error_message"].startswith("threatexchange-pdq.csv (pdq, ")
    # URL and domain lists match before the download: the stage's own columns, and no request at all
    assert (by_name["url"]["blocklist_match"], by_name["url"]["blocklist_kind"]) == ("urls.txt", "url")
    assert (by_name["domain"]["blocklist_match"], by_name["domain"]["blocklist_kind"]) == (
        "domains.txt",
        "domain",
    )
    assert "/p/url.jpg" not in hits
    for name in ("sha", "md5", "pdq", "url", "domain"):
        r = by_name[name]
        assert (r["keep"], r["drop_reason"]) == (False, "blocklist"), name
        assert r["sha256"] is None and r["image_path"] is None, name
    assert by_name["clean"]["keep"] and by_name["clean"]["blocklist_match"] is None
    # The matched images' bytes are nowhere under the output (the clean ones are: the check can fail).
    written = all_bytes_under(out)
    for name in ("sha", "md5", "pdq"):
        assert images[name] not in written, name
    assert images["clean"] in written
    # and `curate select` writes only the clean rows
    sel = tmp_path / "sel"
    assert main(["select", str(out), "--out", str(sel)]) == 0
    with tarfile.open(sel / "00000.tar") as tar:
        assert len([n for n in tar.getnames() if n.endswith(".jpg")]) == 2


def test_blocklist_on_image_folder_input_matches_the_files_bytes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    images = photos()
    for name in ("sha", "clean"):
        (folder / f"{name}.jpg").write_bytes(images[name])
        (folder / f"{name}.txt").write_text(GOOD)
    listed = tmp_path / "list.txt"
    listed.write_text(hashlib.sha1(images["sha"]).hexdigest() + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {folder}}}
output: {tmp_path / "out"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - hash_blocklist: {{sha1: [{listed}]}}
"""
    )
    assert main(["run", str(cfg)]) == 0
    rows = {Path(r["url"]).name: r for r in pq.read_table(tmp_path / "out" / "manifests").to_pylist()}
    assert (rows["sha.jpg"]["drop_reason"], rows["sha.jpg"]["blocklist_kind"]) == ("blocklist", "sha1")
    assert rows["clean.jpg"]["keep"] and rows["clean.jpg"]["blocklist_match"] is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("d41d8cd98f00b204e9800998ecf8427e\nnot-a-digest\n", "bad.txt line 2: not a md5 hex digest"),
        ("", "bad.txt: the list is empty"),
    ],
)
def test_a_malformed_list_fails_validate_naming_file_and_line(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {tmp_path}}}
output: {tmp_path / "out"}
stages:
  - hash_blocklist: {{md5: [{bad}]}}
"""
    )
    assert main(["validate", str(cfg)]) == 2
    assert message in capsys.readouterr().err


def test_blocklist_after_download_is_refused(tmp_path, capsys):
    listed = tmp_path / "l.txt"
    listed.write_text("blocked.example\n")
    pq.write_table(pa.table({"url": ["http://a.example/x.jpg"], "caption": [GOOD]}), tmp_path / "p.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: parquet, path: {tmp_path / "p.parquet"}}}
output: {tmp_path / "out"}
stages:
  - download: {{}}
  - hash_blocklist: {{domain: [{listed}]}}
"""
    )
    assert main(["run", str(cfg)]) == 2
    assert "hash_blocklist must come before download" in capsys.readouterr().err


def test_hash_lists_on_url_input_without_a_download_are_refused(tmp_path, capsys):
    listed = tmp_path / "l.txt"
    listed.write_text(hashlib.md5(b"x").hexdigest() + "\n")
    pq.write_table(pa.table({"url": ["http://a.example/x.jpg"], "caption": [GOOD]}), tmp_path / "p.parquet")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"""input: {{format: parquet, path: {tmp_path / "p.parquet"}}}
output: {tmp_path / "out"}
stages:
  - hash_blocklist: {{md5: [{listed}]}}
"""
    )
    assert main(["validate", str(cfg)]) == 2
    assert "match image bytes, and this pipeline has none: add a download stage" in capsys.readouterr().err
