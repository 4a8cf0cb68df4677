"""Provenance in each selected sample's .json and the dataset card `curate select` writes, through
`curate run` (real downloads from 127.0.0.1) and `curate select`; the card's command reproduces the subset."""

from __future__ import annotations

import hashlib
import json
import shlex
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.cli import main
from tests.imageserver import ImageServer, jpeg

LOOPBACK = "127.0.0.1/32"
GOOD = "A man rides a red bicycle down the street."


def samples(folder: Path) -> dict[str, dict]:
    """{caption + url: (.json, image bytes)} of every sample in a selection."""
    out = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in files.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                out[meta["url"]] = {"meta": meta, "image": files[name[:-5] + ".jpg"]}
    return out


def test_provenance_and_dataset_card(tmp_path, capsys):
    blocked = jpeg("blocked")
    with ImageServer() as server:
        server.files["/p/blocked.jpg"] = blocked
        paths = ["/img/a.jpg", "/img/b.jpg", "/img/c.jpg", "/404/d.jpg", "/p/blocked.jpg"]
        pq.write_table(
            pa.table(
                {
                    "URL": [server.url(p) for p in paths],
                    "TEXT": [GOOD] * 4 + [GOOD],
                    "LICENSE": ["cc-by", "cc0", None, "cc-by", "cc-by"],
                    "NSFW": ["UNLIKELY"] * 5,
                }
            ),
            tmp_path / "pairs.parquet",
        )
        (tmp_path / "md5.txt").write_text(hashlib.md5(blocked).hexdigest() + "\n")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"""input:
  format: parquet
  path: {tmp_path / "pairs.parquet"}
  url_column: URL
  caption_column: TEXT
  columns: [LICENSE, NSFW]
  rows_per_shard: 3
output: {tmp_path / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - hash_blocklist: {{md5: [{tmp_path / "md5.txt"}]}}
  - download: {{timeout: 5, thread_count: 4, allow_private_addresses: [{LOOPBACK}]}}
  - faces: {{}}
"""
        )
        start = int(time.time())
        assert main(["run", str(cfg)]) == 0
        end = int(time.time()) + 1
    run = tmp_path / "run"
    fingerprint = json.loads((run / "run.json").read_text())["config_hash"]
    rows = {
        r["url"].rsplit("/", 2)[-2] + "/" + r["url"].rsplit("/", 1)[-1]: r
        for r in pq.read_table(run / "manifests").to_pylist()
    }
    assert rows["404/d.jpg"]["http_status"] == 404 and rows["404/d.jpg"]["fetched_at"] is not None
    assert rows["p/blocked.jpg"]["http_status"] is None  # fetched (200), but refused: never a success

    sel = tmp_path / "sel"
    assert main(["select", str(run), "--where", "keep AND faces = 0", "--out", str(sel)]) == 0
    got = samples(sel)
    assert len(got) == 3
    for url, s in got.items():
        p = s["meta"]["provenance"]
        assert p["source_url"] == url and p["http_status"] == 200 and p["run_fingerprint"] == fingerprint
        fetched = time.mktime(time.strptime(p["fetched_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        assert start - 1 <= fetched <= end
        assert set(p["license"]) == {"LICENSE"}  # NSFW is carried but is not a licence column
    assert sorted(s["meta"]["provenance"]["license"]["LICENSE"] or "" for s in got.values()) == [
        "",
        "cc-by",
        "cc0",
    ]

    card = json.loads((sel / "dataset_card.json").read_text())
    assert card["run_fingerprint"] == fingerprint
    assert [s["name"] for s in card["stages"]] == ["hash_blocklist", "download", "faces"]
    assert card["stages"][1]["params"]["timeout"] == 5
    assert card["input"]["files"] == [str(tmp_path / "pairs.parquet")] and card["input"]["shards"] == 2
    assert {(d["stage"], d["reason"], d["rows"]) for d in card["counts"]["dropped"]} == {
        ("download", "download", 1),
        ("download", "blocklist", 1),
    }
    assert card["counts"] == {**card["counts"], "rows": 5, "kept": 3}
    assert card["refused"]["blocklists"] == 1 and card["refused"]["opt_outs"] == {}
    assert set(card["model_files"]) == {"hash_blocklist", "faces"}
    assert (
        card["model_files"]["hash_blocklist"]["md5"]["md5.txt"]
        == hashlib.sha256((tmp_path / "md5.txt").read_bytes()).hexdigest()
    )
    assert "opencv-python-headless" in card["versions"] and card["selection"]["samples"] == 3
    md = (sel / "dataset_card.md").read_text()
    assert "| download | blocklist | 1 |" in md and "hash blocklists: 1 rows" in md
    assert json.loads((sel / "sizes.json").read_text()) == {"00000.tar": 3}

    # The card's command, with another --out, writes the same samples.
    command = shlex.split(card["reproduce"]["select"])
    assert command[0] == "curate"
    args = command[1:]
    args[args.index("--out") + 1] = str(tmp_path / "again")
    assert main(args) == 0
    again = samples(tmp_path / "again")
    assert {u: s["image"] for u, s in again.items()} == {u: s["image"] for u, s in got.items()}


def test_the_cards_config_reproduces_the_run(tmp_path):
    import yaml

    from tests.test_faces import face_run

    run = face_run(tmp_path, stages="  - faces: {min_size: 24}\n  - phash: {}\n")
    assert main(["select", str(run), "--where", "faces = 0", "--out", str(tmp_path / "sel")]) == 0
    card = json.loads((tmp_path / "sel" / "dataset_card.json").read_text())
    assert "```yaml" in (tmp_path / "sel" / "dataset_card.md").read_text()
    config = {**card["reproduce"]["config"], "output": str(tmp_path / "again")}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "again.yaml")]) == 0
    again = json.loads((tmp_path / "again" / "run.json").read_text())
    assert again["config_hash"] == card["run_fingerprint"]
    assert (
        pq.read_table(tmp_path / "again" / "manifests")
        .sort_by("uid")
        .equals(pq.read_table(run / "manifests").sort_by("uid"))
    )
