"""A run directory, its ledger and run.json are untrusted input (issue 28): a lying or damaged ledger is
checked, named in one line and repaired by redoing shards; nothing is lost, mixed or widened.
Local disk, memory:// and a real S3 server (moto's, on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from curation.cli import main
from curation.rundir import RunDir, shard_name
from tests.test_ledger import SHARDS, committed_uids, output, tiny_run  # noqa: F401 (fixture)


def status(capsys, out: str) -> dict:
    capsys.readouterr()
    main(["status", out, "--format", "json"])
    return json.loads(capsys.readouterr().out)


def query_count(capsys, out: str) -> tuple[int, int, str]:
    capsys.readouterr()
    code = main(
        ["query", out, "SELECT count(*) AS n, count(DISTINCT uid) AS u FROM samples", "--format", "json"]
    )
    got = capsys.readouterr()
    if code != 0:
        return code, -1, got.err
    rows = [json.loads(line) for line in got.out.splitlines() if line.strip()]
    row = rows[0][0] if isinstance(rows[0], list) else rows[0]
    return row["n"], row["u"], got.err


def test_a_lying_ledger_is_checked_named_and_repaired_by_redoing_shards(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    # A lost manifest (or a hand-made "redo" done halfway); a part naming shards outside the plan; a part
    # claiming 1000x the rows of a shard.
    run.manifest_store.remove(f"{shard_name(3)}.parquet")
    entry5 = run.committed(5)
    run.write_folded_part(
        [{**entry5, "rows": 1000, "kept": 1000}]
        + [{"shard": i, "rows": 7, "kept": 7, "drop_reasons": {}, "seconds": 0} for i in range(100, 150)]
    )

    st = status(capsys, output)
    assert st["shards_total"] == SHARDS and st["shards_done"] <= SHARDS, st  # never "150/12"
    assert st["rows_done"] <= SHARDS and "5" in st["not_trusted"], st
    assert any("outside the plan" in line for line in st["ignored"])

    n, uids, err = query_count(capsys, output)
    assert (n, uids) == (SHARDS - 2, SHARDS - 2), err  # readers skip what is missing, and say so
    assert f"{shard_name(3)}.parquet is missing" in err and "says 1,000 rows" in err

    capsys.readouterr()
    assert main(["run", str(cfg)]) == 0
    got = capsys.readouterr()
    assert "2 shard(s) written" in got.out, got
    assert "redoing the shard" in got.err and f"{shard_name(3)}.parquet is missing" in got.err
    st = status(capsys, output)
    assert (st["shards_done"], st["rows_done"], st["not_trusted"]) == (SHARDS, SHARDS, {}), st
    n, uids, err = query_count(capsys, output)
    assert (n, uids, err) == (SHARDS, SHARDS, "")
    uids = committed_uids(RunDir(output))
    assert len(uids) == SHARDS == len(set(uids))


def test_run_json_deleted_then_a_changed_config_is_refused_the_same_one_adopted(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    run.store.remove("run.json")
    changed = tmp_path / "changed.yaml"
    changed.write_text(cfg.read_text().replace("caption_length: {}", "caption_length: {min_words: 5}"))
    capsys.readouterr()
    assert main(["run", str(changed)]) == 2
    err = capsys.readouterr().err
    # one problem line (under the config's "1 problem(s):" header: `run` checks the output with the config)
    assert "no run.json" in err and "different config" in err and len(err.strip().splitlines()) == 2, err
    assert not RunDir(output).exists(), "nothing adopted"
    assert main(["validate", str(changed)]) == 2
    assert "no run.json" in capsys.readouterr().err

    assert main(["run", str(cfg)]) == 0  # the same config: every entry says so, so they are adopted
    assert f"{SHARDS} already done" in capsys.readouterr().out
    # Entries that do not say which config made them (an older version, another tool): refused.
    run = RunDir(output)
    for i in range(SHARDS):
        entry = run.committed(i)
        entry.pop("config")
        run.ledger_store.put_json(f"{shard_name(i)}.json", entry)
    run.remove_folded_parts(run.folded_store.list(""))
    run.store.remove("run.json")
    assert main(["run", str(cfg)]) == 2
    assert "unknown config" in capsys.readouterr().err


BAD_ENTRIES = {
    1: b"null",
    2: b'{"shard": "2", "rows": 1, "kept": 1}',
    4: b'{"shard": 4, "kept": 1}',
    6: b'{"shard": 6, "rows": 1, "ke',
    7: b'{"shard": 8, "rows": 1, "kept": 1}',  # another shard's entry under this name
}


def test_damaged_ledger_parts_entries_and_run_json_are_one_line_and_repaired(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    for i, data in BAD_ENTRIES.items():
        run.ledger_store.put_bytes(f"{shard_name(i)}.json", data)
    run.folded_store.put_bytes(
        "00000000000000000001-bad.jsonl", b'{"shard": 0, "rows": 1, "kept": 1}\nnull\n'
    )
    run.folded_store.put_bytes("00000000000000000002-bin.jsonl", b"\xff\xfe\x00garbage")

    st = status(capsys, output)
    assert st["shards_done"] == SHARDS - len(BAD_ENTRIES), st
    assert sorted(int(k) for k in st["not_trusted"]) == sorted(BAD_ENTRIES)
    assert sum("is damaged" in line for line in st["ignored"]) == 2, st["ignored"]
    assert query_count(capsys, output)[0] == SHARDS - len(BAD_ENTRIES)

    capsys.readouterr()
    assert main(["run", str(cfg)]) == 0
    assert f"{len(BAD_ENTRIES)} shard(s) written" in capsys.readouterr().out
    run = RunDir(output)
    state = run.ledger_state()
    assert sorted(state.done) == list(range(SHARDS)) and not state.broken and not state.bad_parts
    assert len(state.parts) == 1, "the damaged parts were rewritten from the good entries"
    uids = committed_uids(run)
    assert len(uids) == SHARDS == len(set(uids))

    # A truncated (or edited) run.json: one line naming it, from every command.
    record = run.store.get_bytes("run.json")
    for damaged in (record[: len(record) // 2], b"[]", record.replace(b'"index": 3', b'"index": 2')):
        run.store.put_bytes("run.json", damaged)
        for argv in (
            ["status", output],
            ["query", output, "SELECT 1"],
            ["run", str(cfg)],
            ["report", output, "--out", str(tmp_path / "r.html")],
        ):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith("curate: error: ") and "run.json is damaged" in err, (argv, err)
            # one line (`run` puts it under the config's "1 problem(s):" header, as every config problem)
            assert len(err.strip().splitlines()) == (2 if argv[0] == "run" else 1) and "Traceback" not in err


@pytest.mark.parametrize("kind", ["local"])
def test_status_of_a_plan_listing_a_shard_twice_is_one_line(tmp_path, kind, capsys):
    out = tmp_path / "out"
    cfg = tiny_run(tmp_path, str(out))
    assert main(["run", str(cfg)]) == 0
    record = json.loads((out / "run.json").read_text())
    record["shards"].append(record["shards"][0])
    Path(out / "run.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["status", str(out)]) == 2
    assert "lists shard 0 twice" in capsys.readouterr().err


def test_report_query_and_select_never_write_inside_the_run(tmp_path, output, capsys):  # noqa: F811
    cfg = tiny_run(tmp_path, output)
    assert main(["run", str(cfg)]) == 0
    run = RunDir(output)
    before = {n: run.manifest_store.get_bytes(n) for n in run.committed_manifests()}
    record = run.store.get_bytes("run.json")
    inside = [run.manifest_path(3), run.record_path, run.ledger_store.url_of(f"{shard_name(0)}.json")]
    for out in inside:
        for argv in (
            ["report", output, "--out", out, "--force"],
            [
                "select",
                output,
                "--where",
                "true",
                "--uids-only",
                "--out",
                out.replace(".json", ".parquet"),
                "--force",
            ],
        ):
            capsys.readouterr()
            assert main(argv) == 2, argv
            assert "is inside the run directory" in capsys.readouterr().err
    if run.local:
        capsys.readouterr()
        assert main(["query", output, "SELECT 1", "--out", str(Path(output) / "x.csv")]) == 2
        assert "is inside the run directory" in capsys.readouterr().err
    assert {n: run.manifest_store.get_bytes(n) for n in run.committed_manifests()} == before
    assert run.store.get_bytes("run.json") == record
    assert query_count(capsys, output)[:2] == (SHARDS, SHARDS)


def test_a_where_comment_cannot_escape_the_balancing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny_run(tmp_path, str(out)))]) == 0
    entries = tmp_path / "entries.txt"
    entries.write_text("caption\n")
    balance = ["--balance", str(entries), "--balance-t", "1", "--uids-only"]
    capsys.readouterr()
    assert main(["select", str(out), "--where", "true", *balance, "--out", str(tmp_path / "ok.parquet")]) == 0
    got = capsys.readouterr().out
    kept = int(re.search(r"(\d+) of 12 rows kept", got).group(1))
    assert 0 < kept < SHARDS and f"wrote {kept} uids" in got, got
    escaped = tmp_path / "escaped.parquet"
    assert main(["select", str(out), "--where", "true) --", *balance, "--out", str(escaped)]) == 2
    assert "--where 'true) --'" in capsys.readouterr().err and not escaped.exists()


def webdataset_run(tmp_path: Path, inputs: str, run_out: str) -> Path:
    """A config over 4 real JPEG pairs in one tar at `inputs` (a folder or an s3:// prefix)."""
    import io
    import tarfile

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # the input reader's cached client may know an earlier server

    from tests.imageserver import jpeg

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            for name, payload in (
                (f"{i:03d}.jpg", jpeg(str(i))),
                (f"{i:03d}.txt", f"a photo number {i}".encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    from curation.core.storage import open_store

    open_store(inputs).put_bytes("part-0.tar", buf.getvalue())
    cfg = tmp_path / "wds.yaml"
    cfg.write_text(
        f"""input: {{format: webdataset, path: "{inputs}/part-0.tar", rows_per_shard: 2}}
output: {run_out}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_length: {{min_words: 1}}
"""
    )
    return cfg


@pytest.mark.parametrize("where", ["local", "s3"])
def test_images_are_read_only_from_the_run_and_locations_the_user_names(
    tmp_path, where, request, monkeypatch, capsys
):
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        inputs, output, out = f"s3://{bucket}/in", f"s3://{bucket}/run", f"s3://{bucket}/sel"
    else:
        inputs, output, out = str(tmp_path / "in"), str(tmp_path / "run"), str(tmp_path / "sel")
    monkeypatch.setenv("CURATE_CONFIG_DIR", str(tmp_path / "me"))
    assert main(["run", str(webdataset_run(tmp_path, inputs, output))]) == 0
    report = str(tmp_path / "r.html")
    # My own run: its plan's inputs are read (run.json is signed with my run key).
    assert main(["select", output, "--where", "true", "--out", out + "0"]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out

    # The same run directory in a stranger's hands (or a stranger's run in mine): its plan names the input
    # tars, but a plan may name `/` or another bucket, so on its word nothing outside the run is read.
    monkeypatch.setenv("CURATE_CONFIG_DIR", str(tmp_path / "stranger"))
    capsys.readouterr()
    assert main(["select", output, "--where", "true", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "4 selected images could not be read" in err and err.count("--images-from") == 4, err
    assert main(["report", output, "--out", report]) == 0
    assert "0 thumbnails" in capsys.readouterr().out
    # ... unless the user names the location on the command line.
    assert main(["select", output, "--where", "true", "--out", out + "2", "--images-from", inputs]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out
    assert main(["report", output, "--out", report, "--force", "--images-from", inputs + "/"]) == 0
    assert "4 thumbnails" in capsys.readouterr().out
    # A named location is a boundary, not a prefix of names: "in" does not allow "in-other".
    assert main(["select", output, "--where", "true", "--out", out + "3", "--images-from", inputs[:-1]]) == 1

    # My run key again, but the plan edited to name `/` (or another bucket) too: the signature no longer
    # holds, so not even the real inputs are read on the plan's word.
    monkeypatch.setenv("CURATE_CONFIG_DIR", str(tmp_path / "me"))
    run = RunDir(output)
    record = run.record()
    record["shards"].append(
        {
            "index": 99,
            "path": "/" if where == "local" else "s3://another-bucket",
            "row_start": 0,
            "row_end": 1,
        }
    )
    run.store.put_json("run.json", record)
    assert RunDir(output).trusted_inputs() == []
    assert main(["select", output, "--where", "true", "--out", out + "4"]) == 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_select_takes_the_output_lock(tmp_path, where, request, capsys):
    from curation.core.outputs import exclusive_lock_on
    from curation.core.storage import open_store

    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        inputs, output, out = f"s3://{bucket}/in", f"s3://{bucket}/run", f"s3://{bucket}/sel"
        lock = (open_store(out), ".lock")
    else:
        inputs, output, out = str(tmp_path / "in"), str(tmp_path / "run"), str(tmp_path / "sel")
        lock = (open_store(tmp_path), ".sel.lock")
    assert main(["run", str(webdataset_run(tmp_path, inputs, output))]) == 0
    argv = ["select", output, "--where", "true", "--out", out, "--images-from", inputs]
    with exclusive_lock_on(*lock, "held by the test"):  # another select writing there right now
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "another `curate select` is writing to" in err and len(err.strip().splitlines()) == 1, err
        assert [n for n in open_store(out).list("") if n != ".lock"] == [], "nothing written"
    assert main(argv) == 0
    assert ".lock" not in open_store(out).list(""), "the lock is released, not left"
    assert {"00000.tar", "sizes.json"} <= set(open_store(out).list(""))
    capsys.readouterr()
    assert main(argv) == 2 and "not empty" in capsys.readouterr().err


def test_the_model_cache_checks_every_copy_against_the_object_and_stays_bounded(
    tmp_path, s3, bucket, monkeypatch, capsys
):
    from boto3.s3.transfer import TransferConfig

    from curation.models.files import bound_cache, local_model_path, model_cache_dir

    monkeypatch.setenv("CURATE_CACHE_DIR", str(tmp_path / "cache"))
    c = s3.client()
    url = f"s3://{bucket}/m/w.bin"
    c.put_object(Bucket=bucket, Key="m/w.bin", Body=b"the real weights")
    path = Path(local_model_path(url))
    assert path.read_bytes() == b"the real weights" and capsys.readouterr().err == ""
    assert local_model_path(url) == str(path) and capsys.readouterr().err == "", (
        "an intact copy is used as is"
    )

    for damage in (b"the evil weights", b"the real"):  # changed in place (same size), truncated
        path.write_bytes(damage)
        assert Path(local_model_path(url)).read_bytes() == b"the real weights"
        assert "fetching" in capsys.readouterr().err
    # Planted in advance (the folder's name is computable from one HEAD): a file, or a link elsewhere.
    folder = path.parent
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"planted weights!")
    assert Path(local_model_path(url)).read_bytes() == b"the real weights"
    assert "does not match the object's ETag" in capsys.readouterr().err
    shutil.rmtree(folder)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.bin").write_bytes(b"the real weights")
    folder.symlink_to(tmp_path / "elsewhere")
    assert Path(local_model_path(url)).read_bytes() == b"the real weights" and not folder.is_symlink()
    assert "is a symbolic link" in capsys.readouterr().err

    # A multipart upload's ETag (md5 of the parts' md5s) is checked too.
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (48 * 1024))  # 12 MiB: 3 parts of 5 MiB
    c.upload_file(
        str(big),
        bucket,
        "m/big.bin",
        Config=TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20),
    )
    assert c.head_object(Bucket=bucket, Key="m/big.bin")["ETag"].strip('"').endswith("-3")
    copy = Path(local_model_path(f"s3://{bucket}/m/big.bin"))
    assert local_model_path(f"s3://{bucket}/m/big.bin") == str(copy) and capsys.readouterr().err == ""
    with open(copy, "r+b") as f:
        f.seek(6 << 20)
        f.write(b"x")
    assert Path(local_model_path(f"s3://{bucket}/m/big.bin")).read_bytes() == big.read_bytes()
    assert "multipart ETag" in capsys.readouterr().err

    # Bounded: least recently used folders go first, the one in use never.
    import time

    cache = tmp_path / "cache" / "models"
    assert model_cache_dir() == cache

    def held() -> int:
        return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())

    shutil.rmtree(cache)
    for name in ("a", "b"):
        c.put_object(Bucket=bucket, Key=f"m/{name}.bin", Body=name.encode() * 1000)
    a = Path(local_model_path(f"s3://{bucket}/m/a.bin"))
    time.sleep(0.05)
    copy = Path(local_model_path(f"s3://{bucket}/m/big.bin"))
    monkeypatch.setenv("CURATE_CACHE_MAX_BYTES", str(held() + 500))  # room for a and big, not for b too
    time.sleep(0.05)
    assert Path(local_model_path(f"s3://{bucket}/m/a.bin")) == a  # a used again: big is now the oldest
    time.sleep(0.05)
    b = Path(local_model_path(f"s3://{bucket}/m/b.bin"))
    assert a.exists() and b.exists() and not copy.exists(), "the least recently used folder went"
    assert held() <= int(os.environ["CURATE_CACHE_MAX_BYTES"])
    assert bound_cache(keep=b.parent, limit=0) == [a.parent] and b.exists()


@pytest.mark.parametrize(
    "spec", ["hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", "local-dir:/tmp/some-model"]
)
def test_open_clip_json_with_a_hub_or_folder_image_tower_is_refused_everywhere(tmp_path, spec, capsys):
    import torch

    model = tmp_path / "timm-tower.json"
    model.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"timm_model_name": spec, "timm_pool": "avg", "image_size": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    ck = tmp_path / "ck.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ck)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{format: image_folder, path: {tmp_path}}}\noutput: {tmp_path / 'o'}\n"
        f"stages:\n  - clip_score: {{checkpoint: {ck}, model: {model}}}\n"
    )
    refusal = f"vision_cfg.timm_model_name = {spec!r} names a model"
    capsys.readouterr()
    assert main(["validate", str(cfg)]) == 2
    assert refusal in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--retrieval", str(tmp_path / "none.tar")]) == 2
    assert refusal in capsys.readouterr().err
    train = tmp_path / "t.yaml"
    train.write_text(
        f"model: {{name: {model}}}\ndata: {{shards: {tmp_path}/x.tar}}\noutput_dir: {tmp_path / 't'}\n"
    )
    assert main(["validate", str(train)]) == 2 or main(["train", str(train)]) == 2
    assert refusal in capsys.readouterr().err


MALFORMED_LOCKS = [
    b'{"heartbeat": "soon"}',
    b'{"heartbeat": 9e18, "pid": 9e18}',
    b'{"heartbeat": 1e400}',
    b"[1, 2]",
    b"9e18",
    b"\xff",
]


def test_a_malformed_s3_lock_object_is_judged_by_its_age_never_a_traceback(
    tmp_path, bucket, monkeypatch, capsys
):
    from curation.core import storage

    url = f"s3://{bucket}/out"
    cfg = tiny_run(tmp_path, url)
    assert main(["run", str(cfg), "--limit", "6"]) == 0
    run = RunDir(url)
    for body in MALFORMED_LOCKS:
        run.store.put_bytes(".lock", body)  # just written: its age (the store's clock) says a run may hold it
        capsys.readouterr()
        assert main(["run", str(cfg)]) == 2, body
        err = capsys.readouterr().err
        assert "another `curate run` is writing to" in err and "written recently" in err, (body, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert main(["status", url]) == 0
        assert "a run is in progress" in capsys.readouterr().out
    # Once older than the stale limit, a malformed lock is a dead driver's: taken over.
    monkeypatch.setattr(storage, "LOCK_STALE_S", 0.0)
    assert main(["run", str(cfg)]) == 0
    assert "6 already done" in capsys.readouterr().out
    assert not run.store.exists(".lock")


@pytest.mark.parametrize("name", ["exp[1]", "q?x=1", "a*b"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_output_names_with_glob_characters_run_resume_and_read(tmp_path, where, name, request, capsys):
    if where == "s3":
        out = f"s3://{request.getfixturevalue('bucket')}/{name}"
    else:
        out = str(tmp_path / name)
    cfg = tiny_run(tmp_path, out)
    assert main(["run", str(cfg)]) == 0
    assert main(["run", str(cfg)]) == 0
    assert f"{SHARDS} already done" in capsys.readouterr().out
    assert status(capsys, out)["shards_done"] == SHARDS
    assert query_count(capsys, out)[:2] == (SHARDS, SHARDS)
    RunDir(out).remove_folded_parts([f"{shard_name(i)}.json" for i in range(2)])  # exact names, no glob


def test_an_empty_path_segment_is_one_line_everywhere(tmp_path, bucket, capsys):
    out = f"s3://{bucket}//dbl"
    cfg = tiny_run(tmp_path, out)
    for argv in (["run", str(cfg)], ["status", out], ["query", out, "SELECT 1"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"write s3://{bucket}/dbl" in err and "Traceback" not in err, err


def test_small_ones_are_one_true_line(tmp_path, bucket, capsys):
    # status escapes control characters of the output path, as run does
    out = tmp_path / "evil\x1b[31mred"  # YAML cannot hold the escape: the run is renamed after it ran
    assert main(["run", str(tiny_run(tmp_path, str(tmp_path / "plain")))]) == 0
    (tmp_path / "plain").rename(out)
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\\x1b[31mred" in printed
    # a report over a corrupt manifest names the manifests, not "--where None"
    (out / "manifests" / f"{shard_name(4)}.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "reading the manifests of" in err and "--where" not in err, err
    # a URL inside an S3 run is printed as typed (not s3:/bucket/..., a Path)
    url = f"s3://{bucket}/run"
    assert main(["run", str(tiny_run(tmp_path, url))]) == 0
    capsys.readouterr()
    assert main(["query", url, "SELECT 1", "--out", f"{url}/x.csv"]) == 2
    assert f"--out {url}/x.csv is inside the run directory {url}" in capsys.readouterr().err
    # eval --checkpoint on a text file names the file and says what it is not
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    assert main(["eval", "--checkpoint", str(text), "--retrieval", str(tmp_path / "none.tar")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read checkpoint {text}: not a torch checkpoint" in err and "objects" not in err, err
