"""A trial run with `--limit` extended to the whole input: done shards stay, the rest is added."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq

from curation.cli import main
from tests.helpers import LAION_1K, write_config


def _rows(out):
    t = pq.read_table(out / "manifests", columns=["uid", "keep", "caption_complexity", "caption_verbs"])
    return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)))


def _stat(out):
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "manifests").glob("shard-*.parquet")
    }


def test_limited_run_extends_to_the_whole_input(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, tmp_path / "o", rows_per_shard=300)
    out = tmp_path / "o"
    assert main(["run", str(cfg), "--limit", "150"]) == 0
    assert "150 rows" in capsys.readouterr().out
    trial = _stat(out)
    assert list(trial) == ["shard-00000.parquet"]

    assert main(["run", str(cfg)]) == 0  # no conflict: the limit is not part of the result fingerprint
    assert "850 rows" in capsys.readouterr().out
    assert {k: v for k, v in _stat(out).items() if k in trial} == trial  # the trial's shard is not rewritten
    rows = _rows(out)
    assert len(rows) == 1000 == len({r[0] for r in rows})  # every row once
    plan = json.loads((out / "run.json").read_text())["shards"]
    assert [(s["row_start"], s["row_end"]) for s in plan] == [
        (0, 150),
        (150, 300),
        (300, 600),
        (600, 900),
        (900, 1000),
    ]

    # The same rows and decisions as a run that never had a limit.
    fresh = write_config(tmp_path / "f.yaml", LAION_1K, tmp_path / "fresh", rows_per_shard=300)
    assert main(["run", str(fresh)]) == 0
    assert _rows(tmp_path / "fresh") == rows
    kept = sum(r[1] for r in rows)

    # Nothing left: the run's totals, not "0 rows, 0 kept"; a smaller limit changes nothing.
    capsys.readouterr()
    for argv in (["run", str(cfg)], ["run", str(cfg), "--limit", "10"]):
        assert main(argv) == 0
        said = capsys.readouterr().out
        assert (
            f"5 already done, 0 failed; nothing left to do: the run holds 1,000 rows, {kept:,} kept" in said
        )
    assert len(_rows(out)) == 1000


def test_runs_recorded_with_the_limit_in_their_fingerprint_extend_too(tmp_path, capsys):
    """run.json written before the limit left the fingerprint: resumable and extendable as before."""
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, tmp_path / "o", rows_per_shard=300)
    out = tmp_path / "o"
    assert main(["run", str(cfg), "--limit", "100"]) == 0
    record = json.loads((out / "run.json").read_text())
    old = {**record["fingerprint"], "limit": 100}
    record["fingerprint"] = old
    record["config_hash"] = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]
    del record["limit"]
    (out / "run.json").write_text(json.dumps(record))
    for entry in (out / "ledger").glob("shard-*.json"):  # entries of that time named no config either
        entry.write_text(
            json.dumps({k: v for k, v in json.loads(entry.read_text()).items() if k != "config"})
        )
    assert main(["run", str(cfg), "--limit", "100"]) == 0
    assert "nothing left to do" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0
    assert len(_rows(out)) == 1000
    # A real config change is still refused, naming the key.
    other = write_config(
        tmp_path / "d.yaml", LAION_1K, out, rows_per_shard=300, stages="  - caption_complexity: {min: 3}\n"
    )
    assert main(["run", str(other)]) == 2
    err = capsys.readouterr().err
    assert "stages" in err and "limit" not in err
