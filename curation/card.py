"""Provenance of each selected sample, and the dataset card `curate select` writes beside sizes.json.

A reviewer of a training set asks, per sample, where it came from and under what terms, and for
the whole set, what was done to get it and how to get it again. `curate select` answers both:

- every sample's `{key}.json` carries `provenance`: the source URL, when it was fetched and the
  HTTP status (download stage; null for images an input brought), the input's licence and
  attribution columns when the input has them (LAION's `LICENSE`, Wikimedia-style `license`,
  `author`, `attribution`, ...: carry them with `input.columns`), and the run's fingerprint;
- `dataset_card.json` and `dataset_card.md`: the input, each stage with its parameters and the
  versions and content hashes of what it loaded, counts per stage and drop reason, the rows refused
  by opt-outs, blocklists and decontamination, the selection, and the commands that reproduce it.

What it does not guarantee: a licence column is what the input claims, not a verified licence;
the fetch time is the start of the batch's download (img2dataset records no per-request time).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
from datetime import UTC, datetime
from typing import Any

import yaml

# Input columns whose names say licence or attribution (compared lower-case).
LICENSE_COLUMNS = frozenset(
    {
        "license",
        "licence",
        "license_url",
        "license_name",
        "attribution",
        "author",
        "creator",
        "credit",
        "copyright",
        "rights",
        "photographer",
        "source_url",
    }
)
# Download statuses and error messages that mean the publisher opted out (robots.txt and TDMRep are the
# download stage's statuses; X-Robots-Tag is img2dataset's message).
OPT_OUT_STATUSES = ("robots", "tdm_reservation", "x_robots_tag")
CARD_JSON = "dataset_card.json"
CARD_MD = "dataset_card.md"


def provenance_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c.lower() in LICENSE_COLUMNS]


def provenance(
    row: dict[str, Any], license_columns: list[str], run_fingerprint: str | None
) -> dict[str, Any]:
    fetched = row.get("fetched_at")
    return {
        "source_url": row.get("url"),
        "fetched_at": fetched.isoformat() if isinstance(fetched, datetime) else fetched,
        "http_status": row.get("http_status"),
        "license": {c: row.get(c) for c in license_columns},
        "run_fingerprint": run_fingerprint,
    }


def _versions(stage_names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from curation import __version__

    out = {"curate": __version__, "python": platform.python_version()}
    wanted = {
        "download": "img2dataset",
        "text_spotting": "easyocr",
        "faces": "opencv-python-headless",
        "caption_complexity": "spacy",
        "caption_action": "spacy",
        "clip_score": "open_clip_torch",
        "concepts": "torch",
    }
    for name in stage_names:
        dist = wanted.get(name)
        if dist:
            with contextlib.suppress(PackageNotFoundError):
                out[dist] = version(dist)
    out["pyarrow"] = version("pyarrow")
    out["duckdb"] = version("duckdb")
    return out


def dataset_card(
    con: Any, run: str, record: dict[str, Any], where: str, command: list[str], selection: dict[str, Any]
) -> dict[str, Any]:
    """The card as a JSON-able dict. `con` sees the run's manifests (view `samples`), `record` is its
    run.json, `where` the full condition select used, `command` the select command's arguments."""
    from curation.query import select_statement

    columns = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    [(rows, kept)] = con.execute("SELECT count(*), count(*) FILTER (WHERE keep) FROM samples").fetchall()
    drops = con.execute(
        "SELECT drop_stage, drop_reason, count(*) FROM samples WHERE NOT keep GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    refused: dict[str, Any] = {}
    if "status" in columns:
        statuses = ", ".join(f"'{s}'" for s in OPT_OUT_STATUSES)
        msg = "coalesce(error_message, '') ILIKE '%X-Robots-Tag%'"
        opt = con.execute(
            f"SELECT CASE WHEN {msg} THEN 'x_robots_tag' ELSE status END, count(*) FROM samples "
            f"WHERE status IN ({statuses}) OR {msg} GROUP BY 1 ORDER BY 1"
        ).fetchall()
        refused["opt_outs"] = {k: n for k, n in opt}
    if "blocklist_match" in columns or "status" in columns:
        [(n,)] = con.execute("SELECT count(*) FROM samples WHERE drop_reason = 'blocklist'").fetchall()
        refused["blocklists"] = n
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    if "decontamination" in views:
        [(n,)] = con.execute("SELECT count(DISTINCT uid) FROM decontamination").fetchall()
        refused["decontamination_matched_uids"] = n
    [(selected_rows,)] = con.execute(
        select_statement(f"SELECT count(DISTINCT uid) FROM samples WHERE {where}")
    ).fetchall()
    fingerprint = record.get("fingerprint", {})
    stage_params = fingerprint.get("stages", [])
    stage_names = [next(iter(s)) for s in stage_params]
    files = sorted({str(s.get("path")) for s in record.get("shards", []) if isinstance(s, dict)})
    # The run's config as far as it decides results (runner settings do not): `curate run` on it
    # writes the same manifests. Model files and lists are recorded by content hash, not by place.
    config = {
        "input": {**fingerprint.get("input", {}), "path": files[0] if len(files) == 1 else files},
        "output": run,
        "stages": stage_params,
    }
    return {
        "run": run,
        "run_fingerprint": record.get("config_hash"),
        "run_created": record.get("created"),
        "input": {**fingerprint.get("input", {}), "files": files, "shards": len(record.get("shards", []))},
        "stages": [
            {"name": name, "params": params[name], "order": i}
            for i, (name, params) in enumerate(zip(stage_names, stage_params))
        ],
        "versions": _versions(stage_names),
        "model_files": fingerprint.get("stage_fingerprints", {}),
        "counts": {
            "rows": rows,
            "kept": kept,
            "dropped": [{"stage": s, "reason": r, "rows": n} for s, r, n in drops],
        },
        "refused": refused,
        "selection": {"where": where, "uids": selected_rows, **selection},
        "reproduce": {
            "config": config,
            "run": "curate run CONFIG.yaml   # CONFIG.yaml: reproduce.config, plus the model files and lists "
            "of model_files (named by content hash) at the params that name them",
            "select": shlex.join(["curate", *command]),
        },
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The card for people: the same facts as the JSON, as Markdown."""
    lines = [
        "# Dataset card",
        "",
        f"Selected from the `curate run` output `{card['run']}` (fingerprint `{card['run_fingerprint']}`, "
        f"created {card['run_created']}), written {card['written']}.",
        "",
        "## Input",
        "",
        "```json",
        json.dumps(card["input"], indent=1, default=str),
        "```",
        "",
        "## Stages",
        "",
        "| # | stage | parameters |",
        "| --- | --- | --- |",
    ]
    for s in card["stages"]:
        lines.append(f"| {s['order']} | {s['name']} | `{json.dumps(s['params'], default=str)}` |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in card["versions"].items()), ""]
    if card["model_files"]:
        lines += [
            "## Model files and lists (by content hash)",
            "",
            "```json",
            json.dumps(card["model_files"], indent=1, default=str),
            "```",
            "",
        ]
    c = card["counts"]
    lines += [
        "## Counts",
        "",
        f"{c['rows']:,} rows, {c['kept']:,} kept by the pipeline.",
        "",
        "| stage | drop reason | rows |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {d['stage']} | {d['reason']} | {d['rows']:,} |" for d in c["dropped"]]
    lines += ["", "## Refused", ""]
    r = card["refused"]
    if "opt_outs" in r:
        lines.append("- opt-outs: " + (", ".join(f"{k} {n:,}" for k, n in r["opt_outs"].items()) or "none"))
    if "blocklists" in r:
        lines.append(f"- hash blocklists: {r['blocklists']:,} rows")
    if "decontamination_matched_uids" in r:
        lines.append(
            f"- near-copies of evaluation images (`curate decontaminate`): {r['decontamination_matched_uids']:,} uids"
        )
    if not r:
        lines.append("- nothing: the pipeline had no download, blocklist or decontamination step")
    sel = card["selection"]
    lines += [
        "",
        "## Selection",
        "",
        f"{sel['samples']:,} samples in {sel['shards']} shard(s); condition:",
        "",
        "```sql",
        sel["where"].strip(),
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        card["reproduce"]["run"],
        card["reproduce"]["select"],
        "```",
        "",
        "CONFIG.yaml (what decides results; any runner):",
        "",
        "```yaml",
        yaml.safe_dump(card["reproduce"]["config"], sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
