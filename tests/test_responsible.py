"""The new stages (hash_blocklist, faces) with the runners and storage every stage must support:
kill -9 of `curate run` and resume, the Ray runner, output on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from curation.cli import main
from tests.helpers import kill_run_at_hanging_url
from tests.imageserver import ImageServer

LOOPBACK = "127.0.0.1/32"
GOOD = "A man rides a red bicycle down the street."
# Columns that differ between two runs of the same rows: when the batch was fetched, and the
# img2dataset messages that name a temporary folder.
TIMELY = ("fetched_at", "error_message")


def photo(i: int) -> bytes:
    """Real photos (scikit-image's), cropped differently so every one has its own bytes and hash."""
    arrays = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    a = arrays[i % 4][(i // 4) * 7 :, (i // 4) * 5 :]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def stages_yaml(listed: Path | str, download: str = "") -> str:
    return (
        f"  - hash_blocklist: {{sha256: [{listed}]}}\n"
        + (f"  - download: {{{download}}}\n" if download else "")
        + "  - faces: {}\n  - phash: {}\n"
    )


def rows_of(out: Path | str, drop: tuple[str, ...] = TIMELY) -> pa.Table:
    t = pq.read_table(out if isinstance(out, str) else out / "manifests").sort_by("uid")
    return t.drop_columns([c for c in drop if c in t.column_names])


def test_kill_9_during_a_run_with_blocklist_and_faces_then_resume(tmp_path):
    with ImageServer(hang_seconds=60) as server:
        paths = [f"/p/{i}.jpg" for i in range(8)] + ["/hang/h.jpg"] + [f"/p/{i}.jpg" for i in range(9, 12)]
        for i in [*range(8), *range(9, 12)]:
            server.files[f"/p/{i}.jpg"] = photo(i)
        listed = tmp_path / "sha256.txt"
        listed.write_text(
            hashlib.sha256(photo(1)).hexdigest() + "\n" + hashlib.sha256(photo(10)).hexdigest() + "\n"
        )
        pq.write_table(
            pa.table({"url": [server.url(p) for p in paths], "caption": [GOOD] * 12}), tmp_path / "p.parquet"
        )
        download = f"timeout: 30, thread_count: 4, allow_private_addresses: [{LOOPBACK}]"
        cfg = tmp_path / "c.yaml"
        out = tmp_path / "out"
        cfg.write_text(
            f"""input: {{format: parquet, path: {tmp_path / "p.parquet"}, rows_per_shard: 4}}
output: {out}
runner: {{type: local, workers: 1, progress: false}}
stages:
{stages_yaml(listed, download)}"""
        )
        kill_run_at_hanging_url(cfg, server.hanging)
        done = sorted(p.name for p in (out / "ledger").glob("shard-*.json"))
        assert done == ["shard-00000.json", "shard-00001.json"]
        server.release.set()
        before = dict(server.hits)
        assert main(["run", str(cfg)]) == 0
        assert all(server.hits[f"/p/{i}.jpg"] == before[f"/p/{i}.jpg"] == 1 for i in range(8))
        # the same config from scratch: the resumed run holds exactly what an uninterrupted one does
        assert main(["run", str(cfg), "-o", str(tmp_path / "fresh")]) == 0
    resumed, fresh = rows_of(out), rows_of(tmp_path / "fresh")
    assert resumed.equals(fresh)
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in resumed.to_pylist()}
    assert [u for u, r in sorted(by_url.items()) if r["drop_reason"] == "blocklist"] == ["1.jpg", "10.jpg"]
    assert by_url["0.jpg"]["faces"] == 1 and by_url["4.jpg"]["faces"] == 1  # the astronaut, twice
    assert by_url["2.jpg"]["faces"] == 0 and by_url["h.jpg"]["status"] == "success"
    assert not list((out / "images").rglob(".tmp-*"))


def photo_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(photo(i))
        (folder / f"{i}.txt").write_text(GOOD)
    listed = tmp_path / "sha256.txt"
    listed.write_text(hashlib.sha256(photo(2)).hexdigest() + "\n")
    return folder, listed


def folder_config(
    tmp_path: Path, name: str, folder: Path, listed: Path | str, output: str, runner: str
) -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"""input: {{format: image_folder, path: {folder}, rows_per_shard: 2}}
output: {output}
runner: {runner}
stages:
{stages_yaml(listed)}"""
    )
    return cfg


@pytest.mark.ray
def test_ray_runner_gives_the_local_runners_manifest(tmp_path):
    from tests.test_ray_runner import NETNS, curate

    if NETNS is None:
        pytest.skip("cannot create a network namespace (unshare -n / -rn); Ray must stay on loopback")
    folder, listed = photo_folder(tmp_path)
    local = folder_config(
        tmp_path, "local", folder, listed, str(tmp_path / "local"), "{type: local, progress: false}"
    )
    ray = folder_config(
        tmp_path, "ray", folder, listed, str(tmp_path / "ray"), "{type: ray, progress: false}"
    )
    assert main(["run", str(local)]) == 0
    proc, codes = curate(["run", str(ray)])
    assert codes == [0], proc.stderr[-3000:]
    assert rows_of(tmp_path / "ray").equals(rows_of(tmp_path / "local"))
    t = rows_of(tmp_path / "ray").to_pylist()
    assert (
        sum(r["drop_reason"] == "blocklist" for r in t) == 1 and sum(r["faces"] or 0 for r in t) == 2
    )  # the astronaut, twice


def test_output_and_list_on_s3(tmp_path, bucket):
    from curation.core.storage import open_store

    folder, listed = photo_folder(tmp_path)
    open_store(f"s3://{bucket}/lists").put_bytes("sha256.txt", listed.read_bytes())
    runner = "{type: local, workers: 1, progress: false}"
    remote = folder_config(
        tmp_path, "s3", folder, f"s3://{bucket}/lists/sha256.txt", f"s3://{bucket}/run", runner
    )
    local = folder_config(tmp_path, "local", folder, listed, str(tmp_path / "local"), runner)
    assert main(["run", str(remote)]) == 0
    assert main(["run", str(local)]) == 0
    store = open_store(f"s3://{bucket}/run/manifests")
    names = sorted(n for n in store.list("") if n.endswith(".parquet"))
    on_s3 = pa.concat_tables([pq.read_table(io.BytesIO(store.get_bytes(n))) for n in names]).sort_by("uid")
    assert on_s3.equals(rows_of(tmp_path / "local", drop=()))
    assert main(["select", f"s3://{bucket}/run", "--blur-faces", "--out", f"s3://{bucket}/sel"]) == 0
    sel = open_store(f"s3://{bucket}/sel")
    assert sel.get_json("sizes.json") == {"00000.tar": 5}  # 6 photos, one blocklisted
    assert sel.get_json("dataset_card.json")["refused"]["blocklists"] == 1
