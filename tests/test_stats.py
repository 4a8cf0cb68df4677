"""`curate stats` from the per-shard summaries equals the same computation over the manifests
(`curate stats --exact`, DuckDB): on runs with several stages, nulls, a `--limit` trial extended,
failed then resumed shards, summaries missing (older runs), and on S3.

Exact everywhere except the two sketches, compared with their stated tolerance: the distinct-uid
count once a run holds more than EXACT_UIDS uids (HyperLogLog), and the quantiles (within one
sub-bin, `quantile_error`, of DuckDB's quantile_disc).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.stats import EXACT_UIDS, SUMMARY_DIR, UidSketch, bin_index
from tests.helpers import LAION_1K, write_config

STAGES = (
    "  - caption_length: {min_words: 4, min_chars: 10}\n"
    "  - caption_language: {languages: [en], min_score: 0.5}\n"
    "  - caption_complexity: {min: 2}\n"
)


def stats(out: str | Path, *extra: str, capsys) -> dict:
    assert main(["stats", str(out), "--format", "json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same(summary: dict, exact: dict) -> None:
    """Every number of the two equal, the sketches within their tolerance."""
    assert exact["source"] == "manifests" and not exact["repeated_rows_estimated"]
    for key in ("rows_planned", "rows", "kept", "keep_rate", "filters", "drop_reasons", "nulls"):
        assert summary[key] == exact[key], key
    if summary["repeated_rows_estimated"]:
        assert abs(summary["repeated_rows"] - exact["repeated_rows"]) <= summary["repeated_rows_error"]
    else:
        assert summary["repeated_rows"] == exact["repeated_rows"]
    assert summary["histograms"].keys() == exact["histograms"].keys()
    for col, h in summary["histograms"].items():
        e = exact["histograms"][col]
        for key in ("buckets", "null", "min", "max"):
            assert h[key] == e[key], (col, key)
        assert h["quantiles"].keys() == e["quantiles"].keys()
        for q, v in h["quantiles"].items():
            assert abs(v - e["quantiles"][q]) <= h["quantile_error"] + 1e-9, (col, q, v, e["quantiles"][q])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, bytes]:
    """Two input files: a.parquet (with null and empty captions) and b.parquet, whose data pages are
    damaged (its shards fail) until the caller writes back the returned good bytes."""
    data = tmp_path_factory.mktemp("stats_in")
    src = pq.read_table(LAION_1K, columns=["URL", "TEXT"]).slice(0, 400)
    text = src.column("TEXT").to_pylist()
    for i in range(0, 200, 17):
        text[i] = None if i % 2 else ""
    a = pa.table({"URL": src.column("URL").slice(0, 200), "TEXT": pa.array(text[:200])})
    pq.write_table(a, data / "a.parquet")
    pq.write_table(src.slice(200, 200), data / "b.parquet", compression="none")
    good = (data / "b.parquet").read_bytes()
    raw = bytearray(good)
    for i in range(200, len(raw) // 2):
        raw[i] = 0xFF
    (data / "b.parquet").write_bytes(bytes(raw))
    return data, good


def test_summary_stats_equal_the_manifests_through_trial_failure_resume_and_old_runs(
    inputs, tmp_path, capsys
):
    data, good = inputs
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", f"{data}/*.parquet", out, rows_per_shard=50, stages=STAGES)

    # a --limit trial
    assert main(["run", str(cfg), "--limit", "120"]) == 0
    capsys.readouterr()
    trial = stats(out, capsys=capsys)
    assert trial["source"] == "summaries" and trial["note"] is None and trial["rows"] == 120
    assert_same(trial, stats(out, "--exact", capsys=capsys))

    # extended to the whole input: b.parquet's shards fail, a's finish
    assert main(["run", str(cfg)]) == 1
    capsys.readouterr()
    partial = stats(out, capsys=capsys)
    assert partial["rows"] == 200 and partial["nulls"]["caption_lang_score"] > 0
    assert_same(partial, stats(out, "--exact", capsys=capsys))

    # resumed: the failed shards are redone
    shutil.copy(data / "b.parquet", tmp_path / "bad.parquet")
    (data / "b.parquet").write_bytes(good)
    try:
        assert main(["run", str(cfg)]) == 0
    finally:
        shutil.copy(tmp_path / "bad.parquet", data / "b.parquet")
    capsys.readouterr()
    full = stats(out, capsys=capsys)
    exact = stats(out, "--exact", capsys=capsys)
    assert full["rows"] == 400 and len(full["filters"]) == 3
    assert all(f["dropped"] for f in full["filters"]) and full["kept"] < 400
    assert {"caption_words", "caption_chars", "caption_lang_score", "caption_complexity"} <= set(
        full["histograms"]
    )
    assert_same(full, exact)
    # the folded summary covers every shard: a finished run's stats are that one object
    folded = json.loads((out / SUMMARY_DIR / "folded.json").read_text())
    shards = len(list((out / "manifests").glob("*.parquet")))  # the trial's split shards, and the rest
    assert folded["shards"] == [[0, shards - 1]] and folded["stats"]["rows"] == 400

    # a selection with other thresholds changes nothing: stats reports the run's decisions
    assert main(["select", str(out), "--where", "caption_words >= 2", "--out", str(tmp_path / "u.parquet"),
                 "--uids-only"]) == 0  # fmt: skip
    capsys.readouterr()
    assert stats(out, capsys=capsys) == full

    # without the folded object (a driver killed before its fold): the single summaries; a summary
    # whose shard has no ledger entry (a worker killed before its commit) is not counted
    (out / SUMMARY_DIR / "folded.json").unlink()
    shutil.copy(out / SUMMARY_DIR / "shard-00000.json", out / SUMMARY_DIR / f"shard-{shards:05d}.json")
    assert stats(out, capsys=capsys) == full
    # shards committed by an older curate (no summary): those summarised from their manifests
    (out / SUMMARY_DIR / "shard-00001.json").unlink()
    (out / SUMMARY_DIR / "shard-00006.json").write_text("{not json")
    mixed = stats(out, capsys=capsys)
    assert mixed["note"] == f"2 of {shards} shards had no summary: summarised from their manifests"
    assert {k: v for k, v in mixed.items() if k != "note"} == {k: v for k, v in full.items() if k != "note"}
    # a run with no summaries at all: the manifests, and stats says so
    shutil.rmtree(out / SUMMARY_DIR)
    old = stats(out, capsys=capsys)
    assert old["source"] == "manifests" and "no summaries" in old["note"]
    assert old == exact | {"note": old["note"]}
    assert main(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("note: the run's shards have no summaries") and "p50" in text


def test_stats_on_s3_read_the_summaries(tmp_path, s3, bucket, capsys):
    url = f"s3://{bucket}/run"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, url, rows_per_shard=100, stages=STAGES, workers=2)
    assert main(["run", str(cfg), "--limit", "300"]) == 0
    capsys.readouterr()
    assert "run/summaries/folded.json" in s3.keys(bucket, "run/summaries/")
    summary = stats(url, capsys=capsys)
    assert summary["source"] == "summaries" and summary["rows"] == 300
    assert_same(summary, stats(url, "--exact", capsys=capsys))
    # the same run on local disk: the same stats
    local = tmp_path / "local"
    assert main(["run", str(cfg), "-o", str(local), "--limit", "300"]) == 0
    capsys.readouterr()
    assert stats(local, capsys=capsys) == summary


def test_the_uid_sketch_is_exact_while_small_and_within_its_error_beyond():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**64, size=200_000, dtype=np.uint64)
    small = UidSketch()
    small.add(hashes[:EXACT_UIDS])
    small.add(hashes[:10])
    assert small.exact and small.count() == EXACT_UIDS
    parts = []
    for chunk in np.array_split(hashes, 40):  # 40 "shards", each with repeats of its own and others'
        s = UidSketch()
        s.add(np.concatenate([chunk, chunk[:100], hashes[:50]]))
        parts.append(UidSketch.from_json(json.loads(json.dumps(s.to_json()))))
    merged, reverse = UidSketch(), UidSketch()
    for p in parts:
        merged.merge(p)
    for p in reversed(parts):
        reverse.merge(p)
    assert not merged.exact and merged.count() == reverse.count()
    assert abs(merged.count() - 200_000) <= 0.03 * 200_000  # ~4 standard errors (0.8%)
    # uids that are not curate's hex digests still hash the same way every time
    odd = pa.array(["x", "y", "x", "é" * 32])
    assert list(UidSketch.hash64(odd)) == list(UidSketch.hash64(odd))
    assert len(set(UidSketch.hash64(odd).tolist())) == 3


def test_bins_put_edges_and_outliers_where_duckdb_does():
    import duckdb

    from curation.stats import _bin_sql

    values = np.array(
        [-1.0, -0.998, -1.5, 0.0, 0.28, 0.2799999, 1.0, 1.002, 7.0, 0.002 * 37], dtype=np.float32
    )
    ours = bin_index(values.astype(np.float64), -1, 1.002, 0.002).tolist()
    con = duckdb.connect()
    con.register("t", pa.table({"v": values}))
    theirs = [r[0] for r in con.execute(f"SELECT {_bin_sql('v', -1, 1.002, 0.002)} FROM t").fetchall()]
    assert ours == theirs and ours[2] == -1 and ours[-2] == 1001


def test_every_numeric_stage_column_declares_its_bins():
    """A numeric column without bins would be missing from `curate stats`' histograms."""
    from curation.schema import HASH_COLUMNS
    from curation.stages import manifest_bins, manifest_columns

    bins = manifest_bins()
    numeric = {
        name
        for name, t in manifest_columns().items()
        if (pa.types.is_integer(t) or pa.types.is_floating(t)) and name not in HASH_COLUMNS
    }
    assert numeric - set(bins) == set()
    for name, (lo, hi, step) in bins.items():
        assert lo < hi and step > 0 and (hi - lo) / step <= 10_000, name  # bounded summaries
