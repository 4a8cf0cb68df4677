"""Hostile inputs that bring their own images: webdataset tars (member bombs, GNU sparse and .tar.gz,
repeated keys, `./` members, dots in folder names, non-string captions) and image folders (symlinks
out of the folder, FIFOs, /dev/zero). Real tars made by GNU tar and tarfile, real FIFOs and symlinks,
through `curate run`, `curate select`, the trainer's reader and `curate eval`'s folder reader: every
refusal is a per-row status, and no good row is lost, duplicated or paired with another's caption."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main
from curation.core.shards import (
    DUPLICATE_KEY,
    TOO_LARGE,
    TarWriter,
    read_samples,
    repeated_keys,
    split_member_name,
)
from tests.helpers import REPO
from tests.imageserver import jpeg

GIB = 2**30


def caption(name: str) -> str:
    return f"a photo of sample {name}"


def image(name: str) -> bytes:
    return jpeg(name)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class Zeros(io.RawIOBase):
    """`n` zero bytes, streamed: a 100 MB member is written without holding it."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def make_tars(folder: Path) -> dict[str, Path]:
    """Four input tars; the good samples (key -> caption) are listed in GOOD below."""
    folder.mkdir()
    tars = {}

    # 1. `tar -C dir -cf x.tar .`: members ./000.jpg ...
    src = folder / "src"
    src.mkdir()
    for key in ("000", "001"):
        (src / f"{key}.jpg").write_bytes(image(f"dotslash/{key}"))
        (src / f"{key}.txt").write_text(caption(key))
    tars["dotslash"] = folder / "a-dotslash.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(tars["dotslash"]), "."], check=True)
    with tarfile.open(tars["dotslash"]) as tar:
        assert any(n.startswith("./") for n in tar.getnames())

    # 2. a dot in a folder name, a key twice (not consecutively), a number as the .json caption
    tars["mixed"] = folder / "b-mixed.tar"
    with tarfile.open(tars["mixed"], "w") as tar:
        add(tar, "v1.2/a.jpg", image("mixed/v1.2/a"))
        add(tar, "v1.2/a.txt", caption("v1.2/a").encode())
        add(tar, "dup.jpg", image("mixed/dup-first"))
        add(tar, "dup.txt", b"the first dup caption")
        add(tar, "b.jpg", image("mixed/b"))
        add(tar, "b.txt", caption("b").encode())
        add(tar, "dup.jpg", image("mixed/dup-second"))
        add(tar, "dup.txt", b"the second dup caption")
        add(tar, "num.jpg", image("mixed/num"))
        add(tar, "num.json", json.dumps({"caption": 5, "url": "http://x/num.jpg"}).encode())
        add(tar, "c.jpg", image("mixed/c"))
        add(tar, "c.json", json.dumps({"caption": caption("c")}).encode())

    # 3. GNU sparse (GNU tar --sparse): 10 KB on disk, big.jpg declares 1 GiB
    sparse = folder / "sparse-src"
    sparse.mkdir()
    with open(sparse / "big.jpg", "wb") as f:
        f.write(image("sparse/big"))
        f.truncate(GIB)
    (sparse / "big.txt").write_text(caption("big"))
    (sparse / "d.jpg").write_bytes(image("sparse/d"))
    (sparse / "d.txt").write_text(caption("d"))
    tars["sparse"] = folder / "c-sparse.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            "-C",
            str(sparse),
            "-cf",
            str(tars["sparse"]),
            "big.jpg",
            "big.txt",
            "d.jpg",
            "d.txt",
        ],
        check=True,
    )
    (sparse / "big.jpg").unlink()
    assert tars["sparse"].stat().st_size < 100_000
    with tarfile.open(tars["sparse"]) as tar:
        assert tar.getmember("big.jpg").issparse()

    # 4. .tar.gz: about 100 KB, e.jpg declares 100 MiB (over the default 64 MiB limit)
    tars["gz"] = folder / "d-bomb.tar.gz"
    with tarfile.open(tars["gz"], "w:gz") as tar:
        info = tarfile.TarInfo("e.jpg")
        info.size = 100 * 2**20
        tar.addfile(info, io.BufferedReader(Zeros(info.size)))
        add(tar, "e.txt", caption("e").encode())
        add(tar, "f.jpg", image("gz/f"))
        add(tar, "f.txt", caption("f").encode())
    assert tars["gz"].stat().st_size < 1_000_000
    return tars


# (tar, key) -> (image seed, caption) of every good sample
GOOD = {
    ("dotslash", "000"): ("dotslash/000", caption("000")),
    ("dotslash", "001"): ("dotslash/001", caption("001")),
    ("mixed", "v1.2/a"): ("mixed/v1.2/a", caption("v1.2/a")),
    ("mixed", "b"): ("mixed/b", caption("b")),
    ("mixed", "c"): ("mixed/c", caption("c")),
    ("sparse", "d"): ("sparse/d", caption("d")),
    ("gz", "f"): ("gz/f", caption("f")),
}
REFUSED = {
    ("mixed", "dup"): DUPLICATE_KEY,
    ("mixed", "num"): "bad_caption",
    ("sparse", "big"): TOO_LARGE,
    ("gz", "e"): TOO_LARGE,
}


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> dict[str, Path]:
    return make_tars(tmp_path_factory.mktemp("hostile") / "tars")


def test_member_names_normalise_to_webdataset_keys():
    assert split_member_name("./000.jpg") == ("000", "jpg")
    assert split_member_name("000.JPG") == ("000", "jpg")
    assert split_member_name("v1.2/0001.concepts.json") == ("v1.2/0001", "concepts.json")
    assert split_member_name("./a/./b/0001.txt") == ("a/b/0001", "txt")
    assert split_member_name("/abs/0001.txt") == ("abs/0001", "txt")
    for name in ("../0001.jpg", ".hidden", "noext", "a/.jpg"):
        assert split_member_name(name) is None, name


def test_the_reader_refuses_bombs_and_repeated_keys_per_sample(tars):
    got = {}
    for name, path in tars.items():
        repeated = repeated_keys(str(path))
        for s in read_samples(str(path), refuse_keys=repeated):
            got.setdefault((name, s.key), []).append(s)
    assert [s.status for s in got[("mixed", "dup")]] == [DUPLICATE_KEY, DUPLICATE_KEY]
    assert got[("sparse", "big")][0].status == TOO_LARGE
    assert "declares 1,073,741,824 bytes > the limit of 67,108,864" in got[("sparse", "big")][0].detail
    assert "jpg" not in got[("sparse", "big")][0].members and "jpg" not in got[("gz", "e")][0].members
    for (tar, key), (seed, _) in GOOD.items():
        (s,) = got[(tar, key)]
        assert s.status is None and s.image() == ("jpg", image(seed))
    # Without the headers-only pass, the second occurrence is still refused; a file object works too.
    with open(tars["mixed"], "rb") as f:
        dups = [s for s in read_samples(f) if s.key == "dup"]
    assert [s.status for s in dups] == [None, DUPLICATE_KEY]
    # The limit is configurable.
    small = {s.key: s.status for s in read_samples(str(tars["mixed"]), max_member_bytes=100)}
    assert small["b"] == TOO_LARGE


def test_reading_member_bombs_stays_small_in_memory(tars):
    """Peak RSS of a process reading the GNU sparse (1 GiB declared) and .tar.gz (100 MiB) tars:
    with the whole member read it would be over 1 GB."""
    code = (
        "import sys\n"
        "from curation.core.shards import read_samples\n"
        "for p in sys.argv[1:]:\n"
        "    for s in read_samples(p):\n"
        "        pass\n"
        # VmHWM is this process's own peak: ru_maxrss would carry the forking pytest's (GBs) over exec
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tars["sparse"]), str(tars["gz"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(out.stdout) < 400_000, out.stdout  # KiB: far below the 1 GiB a member read would cost


def run_webdataset(tmp_path: Path, tars: dict[str, Path]) -> dict[tuple[str, str], list[dict]]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{format: webdataset, path: {[str(p) for p in tars.values()]}}}\n"
        f"output: {tmp_path / 'out'}\nrunner: {{workers: 1, progress: false}}\nstages: [caption_length]\n"
    )
    assert main(["run", str(cfg)]) == 0
    names = {str(p): n for n, p in tars.items()}
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in pq.read_table(tmp_path / "out" / "manifests").to_pylist():
        tar = names[r["url"].split("#")[0]] if "#" in r["url"] else "mixed"
        rows.setdefault((tar, r["key"]), []).append(r)
    return rows


def test_run_and_select_keep_every_good_pair_and_refuse_the_rest_per_row(tmp_path, tars, capsys):
    rows = run_webdataset(tmp_path, tars)
    # every sample is one row: nothing lost, nothing duplicated (the repeated key is two samples)
    assert sorted(rows) == sorted([*GOOD, *REFUSED])
    assert len(rows[("mixed", "dup")]) == 2
    assert sum(len(v) for v in rows.values()) == len(GOOD) + len(REFUSED) + 1
    for where, status in REFUSED.items():
        for r in rows[where]:
            assert (r["read_status"], r["keep"], r["drop_reason"], r["image_path"]) == (
                status,
                False,
                "input",
                None,
            ), r
            assert r["read_error"]
    assert "is not a string (JSON number)" in rows[("mixed", "num")][0]["read_error"]
    for where, (_, text) in GOOD.items():
        (r,) = rows[where]
        assert (r["read_status"], r["read_error"], r["caption"], r["keep"]) == ("ok", None, text, True), r
        assert r["image_path"] == str(tars[where[0]])

    capsys.readouterr()
    assert main(["select", str(tmp_path / "out"), "--out", str(tmp_path / "sel")]) == 0
    selected = {}
    for tar in sorted((tmp_path / "sel").glob("*.tar")):
        for s in read_samples(str(tar)):
            meta = json.loads(s.members["json"])
            selected[(Path(meta["image_path"]).name, meta["source_key"])] = s
    # `./` members and dotted folders are found; each image comes with its own caption
    assert sorted(selected) == sorted((tars[t].name, k) for t, k in GOOD)
    for (tar, key), (seed, text) in GOOD.items():
        s = selected[(tars[tar].name, key)]
        assert s.status is None
        assert s.members["jpg"] == image(seed)
        assert s.members["txt"].decode() == text


def test_select_never_pairs_two_samples_of_one_key(tars):
    """Manifests of older runs hold both rows of a repeated key, with their image: select refuses
    both rather than giving one row the other's image; old `./` keys still match."""
    from curation.select import read_image_group

    rows = [
        {"image_path": str(tars["mixed"]), "key": "dup", "caption": "the first dup caption"},
        {"image_path": str(tars["mixed"]), "key": "dup", "caption": "the second dup caption"},
        {"image_path": str(tars["mixed"]), "key": "b", "caption": caption("b")},
    ]
    unreadable: list[str] = []
    got = list(read_image_group(Path("/"), rows, unreadable))
    assert [(r["key"], data) for r, data in got] == [("b", image("mixed/b"))]
    assert unreadable == [f"{tars['mixed']}: key dup names more than one sample of this tar"]
    old = [{"image_path": str(tars["dotslash"]), "key": "./001", "caption": caption("001")}]
    assert [data for _, data in read_image_group(Path("/"), old, unreadable)] == [image("dotslash/001")]


def test_trainer_eval_and_mine_read_tars_through_the_same_limits(tars, caplog):
    from train.data import _raw_samples
    from train.evaluate import read_pairs
    from train.mining.store import _samples

    keys = [s["__key__"] for name in ("mixed", "sparse", "gz") for s in _raw_samples(str(tars[name]))]
    # the trainer cannot see the repeated key's first occurrence as unsafe in one pass; the second is left out
    assert keys == ["v1.2/a", "dup", "b", "num", "c", "d", "f"]
    assert "left out sample 'dup'" in caplog.text and "left out sample 'big'" in caplog.text
    assert "left out sample 'e'" in caplog.text
    images, captions = read_pairs([str(tars["sparse"]), str(tars["gz"])])
    assert (len(images), captions) == (2, [caption("d"), caption("f")])
    mined = list(_samples(str(tars["sparse"])))
    assert [(data, text) for _, data, text in mined] == [(image("sparse/d"), caption("d"))]


def test_shard_writer_writes_what_the_reader_reads(tmp_path):
    with TarWriter(tmp_path, shard_size=2) as w:
        for i in range(3):
            w.add(f"{i:09d}", {"jpg": image(str(i)), "txt": caption(str(i)).encode(), "concepts.json": b"{}"})
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.tar", "00001.tar", "sizes.json"]
    back = [s for t in ("00000.tar", "00001.tar") for s in read_samples(str(tmp_path / t))]
    assert [sorted(s.members) for s in back] == [["concepts.json", "jpg", "txt"]] * 3
    for bad in ("./x", "a.b", "../x", ""):
        with pytest.raises(ValueError):
            TarWriter(tmp_path / "n", 1).add(bad, {"txt": b""})


# ---------------------------------------------------------------------------- image folders


def make_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (tmp_path / "secret.txt").write_text("SECRET: outside the folder")
    (tmp_path / "elsewhere.jpg").write_bytes(image("elsewhere"))
    (folder / "good.jpg").write_bytes(image("good"))
    (folder / "good.txt").write_text(caption("good"))
    (folder / "leak.jpg").write_bytes(image("leak"))
    (folder / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (folder / "outside.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    (folder / "inside.jpg").symlink_to(folder / "good.jpg")  # a link within the folder is fine
    os.mkfifo(folder / "fifo.jpg")
    (folder / "fifocap.jpg").write_bytes(image("fifocap"))
    os.mkfifo(folder / "fifocap.txt")
    (folder / "z.jpg").symlink_to("/dev/zero")
    (folder / "big.jpg").write_bytes(image("big") + bytes(2_000_000))
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "x.jpg").write_bytes(image("x"))
    (folder / "linked").symlink_to(linked)  # a symlinked folder is not entered
    return folder


@pytest.mark.timeout(120)  # a FIFO read without a writer would block forever
def test_image_folder_stays_inside_reads_regular_files_only_and_bounded(tmp_path, capsys):
    folder = make_folder(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{format: image_folder, path: {folder}, max_member_bytes: 1000000}}\n"
        f"output: {tmp_path / 'out'}\nrunner: {{workers: 1, progress: false}}\nstages: [caption_length]\n"
    )
    assert main(["run", str(cfg)]) == 0
    rows = {Path(r["url"]).name: r for r in pq.read_table(tmp_path / "out" / "manifests").to_pylist()}
    assert sorted(rows) == sorted(
        ["good.jpg", "leak.jpg", "outside.jpg", "inside.jpg", "fifo.jpg", "fifocap.jpg", "z.jpg", "big.jpg"]
    )
    want = {
        "leak.jpg": "outside_folder",
        "outside.jpg": "outside_folder",
        "z.jpg": "outside_folder",
        "fifo.jpg": "not_a_file",
        "fifocap.jpg": "not_a_file",
        "big.jpg": "too_large",
    }
    for name, status in want.items():
        r = rows[name]
        assert (r["read_status"], r["keep"], r["drop_reason"], r["image_path"], r["caption"]) == (
            status,
            False,
            "input",
            None,
            None,
        ), r
    assert "secret.txt, outside" in rows["leak.jpg"]["read_error"]
    good, inside = rows["good.jpg"], rows["inside.jpg"]
    assert (good["read_status"], good["caption"], good["keep"]) == ("ok", caption("good"), True)
    # no caption: caption_length drops it, but its image was read
    assert (inside["read_status"], inside["caption"], inside["image_path"]) == (
        "ok",
        None,
        str(folder / "inside.jpg"),
    )
    assert "SECRET" not in str(list(rows.values()))

    capsys.readouterr()
    assert main(["select", str(tmp_path / "out"), "--out", str(tmp_path / "sel")]) == 0
    (tar,) = (tmp_path / "sel").glob("*.tar")
    got = [s.members for s in read_samples(str(tar))]
    assert [(m["jpg"], m["txt"].decode()) for m in got] == [(image("good"), caption("good"))]


@pytest.mark.timeout(120)
def test_eval_folder_reader_refuses_fifos_links_out_and_dev_zero(tmp_path, caplog):
    from train.evaluate import read_image_folder

    root = tmp_path / "classes"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "cat" / "a.jpg")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(root / "dog" / "b.png")
    os.mkfifo(root / "cat" / "fifo.jpg")
    (root / "dog" / "z.jpg").symlink_to("/dev/zero")
    (tmp_path / "out.jpg").write_bytes(image("out"))
    (root / "dog" / "out.jpg").symlink_to(tmp_path / "out.jpg")
    images, labels, names = read_image_folder(root)
    assert (len(images), labels, names) == (2, [0, 1], ["cat", "dog"])
    assert "left out 3 images" in caplog.text
    for part in ("fifo.jpg (not_a_file)", "z.jpg (outside_folder)", "out.jpg (outside_folder)"):
        assert part in caplog.text
