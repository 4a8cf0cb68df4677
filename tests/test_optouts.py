"""Opt-outs and polite downloading through `curate run`, against real HTTP servers on several loopback
addresses (127.0.0.2, 127.0.0.3, ...: one site each): robots.txt in its variants, TDMRep, X-Robots-Tag,
429 with Retry-After, a host that keeps failing, per-host concurrency and rate seen by the server."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.core.crawl import HostGate, Manners
from curation.core.urlpolicy import UrlPolicy
from tests.helpers import REPO, kill_run_at_hanging_url, netns_prefix
from tests.imageserver import ImageServer

CAPTION = "A man rides a red bicycle down the street."
CONTACT = "https://example.org/our-crawler"
NETNS = netns_prefix()


@contextlib.contextmanager
def sites(n: int, **kwargs):
    """n image servers, on 127.0.0.2 ... 127.0.0.(n+1)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(ImageServer(host=f"127.0.0.{2 + i}", **kwargs)) for i in range(n)]


def write_config(tmp: Path, urls: list[str], params: str, rows_per_shard: int = 100) -> Path:
    tmp.mkdir(exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": [CAPTION] * len(urls)}), tmp / "pairs.parquet")
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"input: {{path: {tmp / 'pairs.parquet'}, rows_per_shard: {rows_per_shard}}}\n"
        f"output: {tmp / 'out'}\n"
        "runner: {workers: 1, progress: false}\n"
        "stages:\n"
        f"  - download: {{timeout: 2, thread_count: 8, allow_private_addresses: true, {params}}}\n"
    )
    return cfg


def rows_by_url(tmp: Path, urls: list[str]) -> dict[str, dict]:
    rows = pq.read_table(tmp / "out" / "manifests").to_pylist()
    assert sorted(r["url"] for r in rows) == sorted(urls)  # nothing lost, nothing twice
    return {r["url"]: r for r in rows}


def run(tmp: Path, urls: list[str], params: str = "", rows_per_shard: int = 100) -> dict[str, dict]:
    assert main(["run", str(write_config(tmp, urls, params, rows_per_shard))]) == 0
    return rows_by_url(tmp, urls)


def robots(text: str, code: int = 200, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return code, {"Content-Type": "text/plain", **headers}, text.encode()


def test_robots_txt_variants_decide_before_any_image_is_requested(tmp_path):
    with sites(8) as (
        rules,
        missing,
        error,
        malformed,
        huge,
        redirected,
        slow,
        forbidden,
    ):
        rules.responses["/robots.txt"] = robots(
            "User-agent: otherbot\nDisallow: /\n\n"
            "User-agent: curate\nDisallow: /img/private/\nAllow: /img/private/ok\n"
        )
        error.responses["/robots.txt"] = robots("down", 503)
        malformed.responses["/robots.txt"] = (200, {}, bytes(range(256)) * 40 + b"\nDisallow /img\n")
        # The first 500 KiB are parsed, like Google: a rule after them does not count.
        huge.responses["/robots.txt"] = robots(
            "User-agent: *\nDisallow: /img/early/\n" + "# padding\n" * 60_000 + "Disallow: /img/\n"
        )
        # A redirect is followed to another host's file, whose rules then apply.
        rules.responses["/moved-robots.txt"] = robots("User-agent: *\nDisallow: /img/\n")
        redirected.responses["/robots.txt"] = (301, {"Location": rules.url("/moved-robots.txt")}, b"")
        slow.responses["/robots.txt"] = robots("User-agent: *\nAllow: /\n")
        slow.delays["/robots.txt"] = 5  # more than the total_timeout: not fetched, so not allowed
        forbidden.responses["/robots.txt"] = robots("no", 403)  # 4xx: as if missing

        urls = {
            rules.url("/img/private/a.jpg"): "robots",
            rules.url("/img/private/ok.jpg"): "success",
            rules.url("/img/b.jpg"): "success",
            missing.url("/img/c.jpg"): "success",
            missing.url("/img/d.jpg"): "success",
            error.url("/img/e.jpg"): "robots",
            malformed.url("/img/f.jpg"): "success",
            huge.url("/img/early/g.jpg"): "robots",
            huge.url("/img/h.jpg"): "success",
            redirected.url("/img/i.jpg"): "robots",
            slow.url("/img/j.jpg"): "failed_to_download",
            forbidden.url("/img/k.jpg"): "success",
        }
        rows = run(tmp_path, list(urls), f"total_timeout: 2, contact_url: '{CONTACT}'")
        for url, status in urls.items():
            assert rows[url]["status"] == status, (url, rows[url]["error_message"])
            assert rows[url]["drop_reason"] == {"success": None, "robots": "opt_out"}.get(status, "download")
        # Nothing a robots.txt refused was requested; each robots.txt once for all its host's rows.
        assert rules.hits["/img/private/a.jpg"] == 0 and error.hits["/img/e.jpg"] == 0
        assert redirected.hits["/img/i.jpg"] == 0 and slow.hits["/img/j.jpg"] == 0
        for site in (rules, missing, error, malformed, huge, redirected, forbidden):
            assert site.hits["/robots.txt"] == 1
        assert "HTTP 503" in rows[error.url("/img/e.jpg")]["error_message"]
        # A robots.txt that never came is no opt-out the site stated: the row fails as a download.
        assert "robots.txt not fetched (TimeoutError" in rows[slow.url("/img/j.jpg")]["error_message"]
        assert (
            "disallows this path for user-agent curate"
            in rows[rules.url("/img/private/a.jpg")]["error_message"]
        )
        # Every request, robots.txt included, names the crawler and how to reach its operator.
        for site in (rules, missing, huge):
            assert site.agents == {f"Mozilla/5.0 (compatible; curate/0.1.0; +{CONTACT})"}


def test_unreachable_robots_txt_may_be_allowed_and_opt_outs_switched_off(tmp_path):
    with sites(2) as (error, rules):
        error.responses["/robots.txt"] = robots("down", 500)
        rules.responses["/robots.txt"] = robots("User-agent: *\nDisallow: /\n")
        urls = [error.url("/img/a.jpg"), rules.url("/img/b.jpg")]
        rows = run(tmp_path / "a", urls, "optouts_unreachable: allow")
        assert rows[urls[0]]["status"] == "success" and rows[urls[1]]["status"] == "robots"
        rows = run(tmp_path / "b", urls, "respect_robots_txt: false, respect_tdmrep: false")
        assert [rows[u]["status"] for u in urls] == ["success", "success"]
        assert rules.hits["/robots.txt"] == 1  # the second run did not ask
        assert error.hits["/.well-known/tdmrep.json"] == 1  # asked once: robots.txt let the row through
        assert rules.hits["/.well-known/tdmrep.json"] == 0  # robots.txt refused first


def test_robots_token_is_configurable(tmp_path):
    with sites(1) as (site,):
        site.responses["/robots.txt"] = robots("User-agent: acme-crawler\nDisallow: /\n")
        urls = [site.url("/img/a.jpg")]
        rows = run(tmp_path, urls, "user_agent_token: acme-crawler")
        assert rows[urls[0]]["status"] == "robots"
        assert site.agents == {"Mozilla/5.0 (compatible; acme-crawler/0.1.0)"}


def test_tdmrep_file_and_headers_and_x_robots_tag(tmp_path):
    with sites(2) as (declared, headers):
        declared.responses["/.well-known/tdmrep.json"] = (
            200,
            {"Content-Type": "application/json"},
            json.dumps(
                [
                    {"location": "/img/free*", "tdm-reservation": 0},
                    {"location": "/img/*", "tdm-reservation": 1, "tdm-policy": "https://x.test/p.json"},
                ]
            ).encode(),
        )
        for path, extra in {
            "/h/tdm.jpg": {"tdm-reservation": "1", "tdm-policy": "https://x.test/p.json"},
            "/h/tdm0.jpg": {"tdm-reservation": "0"},
            "/h/noai.jpg": {"X-Robots-Tag": "noai"},
            "/h/ours.jpg": {"X-Robots-Tag": "curate: noimageai"},
            "/h/theirs.jpg": {"X-Robots-Tag": "otherbot: noai"},
        }.items():
            headers.responses[path] = (200, {"Content-Type": "image/jpeg", **extra}, _jpeg(path))
        urls = {
            declared.url("/img/free-a.jpg"): "success",
            declared.url("/img/b.jpg"): "tdm_reservation",
            declared.url("/png/c.png"): "success",
            headers.url("/h/tdm.jpg"): "tdm_reservation",
            headers.url("/h/tdm0.jpg"): "success",
            headers.url("/h/noai.jpg"): "x_robots_tag",
            headers.url("/h/ours.jpg"): "x_robots_tag",
            headers.url("/h/theirs.jpg"): "success",
        }
        rows = run(tmp_path, list(urls))
        for url, status in urls.items():
            assert rows[url]["status"] == status, (url, rows[url]["error_message"])
        assert declared.hits["/img/b.jpg"] == 0 and declared.hits["/.well-known/tdmrep.json"] == 1
        assert "location '/img/*'" in rows[declared.url("/img/b.jpg")]["error_message"]
        assert "https://x.test/p.json" in rows[headers.url("/h/tdm.jpg")]["error_message"]


def _jpeg(seed: str) -> bytes:
    from tests.imageserver import jpeg

    return jpeg(seed)


def test_429_is_retried_after_its_retry_after_and_a_longer_one_fails_the_row(tmp_path):
    with sites(1) as (site,):
        waits, too_long = site.url("/busy/1/1/a.jpg"), site.url("/busy/5/3600/b.jpg")
        rows = run(tmp_path, [waits, too_long], "max_retry_after: 30")
        assert rows[waits]["status"] == "success" and site.hits["/busy/1/1/a.jpg"] == 2
        first, second = site.arrivals["/busy/1/1/a.jpg"]
        assert second - first >= 0.5  # the host paused for its Retry-After (1 s) before the retry
        assert rows[too_long]["status"] == "failed_to_download" and "429" in rows[too_long]["error_message"]
        assert site.hits["/busy/5/3600/b.jpg"] == 1  # not waited for an hour, not retried


def test_a_host_that_keeps_failing_is_given_up_for_the_rest_of_the_shard(tmp_path):
    with sites(2) as (failing, fine):
        urls = [failing.url(f"/fail/{i}.jpg") for i in range(8)] + [
            fine.url(f"/img/{i}.jpg") for i in range(4)
        ]
        # two shards of 6 rows: the failing host's first six rows, then its last two with the good host's
        rows = run(
            tmp_path,
            urls,
            "host_max_failures: 3, host_max_concurrent: 1",  # 8 threads wait for the one slot
            rows_per_shard=6,
        )
        statuses = [rows[u]["status"] for u in urls]
        # which three of the first shard's rows get the slot first is the threads' race
        assert sorted(statuses[:6]) == ["failed_to_download"] * 3 + ["host_given_up"] * 3
        assert statuses[6:8] == ["failed_to_download"] * 2  # a new shard tries the host again
        assert statuses[8:] == ["success"] * 4
        assert sum(failing.hits[f"/fail/{i}.jpg"] for i in range(8)) == 5
        given_up = next(rows[u] for u in urls[:6] if rows[u]["status"] == "host_given_up")
        assert "given up for the rest of the shard after 3 consecutive failures" in given_up["error_message"]
        assert {rows[u]["drop_reason"] for u in urls[:8]} == {"download"}


def test_per_host_concurrency_and_rate_are_capped(tmp_path):
    with sites(2, slow_seconds=0.3) as (a, b):
        urls = [a.url(f"/slow/{i}.jpg") for i in range(8)] + [b.url(f"/slow/{i}.jpg") for i in range(8)]
        rows = run(tmp_path / "cap", urls, "host_max_concurrent: 2, host_max_rate: null")
        assert all(r["status"] == "success" for r in rows.values())
        assert a.max_in_flight == 2 and b.max_in_flight == 2  # 8 threads, two per host at most
    with sites(1) as (c,):
        urls = [c.url(f"/img/{i}.jpg") for i in range(6)]
        rows = run(
            tmp_path / "rate", urls, "host_max_rate: 4, respect_robots_txt: false, respect_tdmrep: false"
        )
        assert all(r["status"] == "success" for r in rows.values())
        starts = sorted(t for p, ts in c.arrivals.items() if p.startswith("/img/") for t in ts)
        # Six request starts at most 4 a second: the server saw them spread over 5 intervals of 0.25 s.
        assert starts[-1] - starts[0] >= 5 * 0.25 * 0.8


def test_crawl_delay_is_honoured_up_to_its_cap_and_retries_can_be_switched_off(tmp_path):
    with sites(2) as (delayed, busy):
        delayed.responses["/robots.txt"] = robots("User-agent: *\nCrawl-delay: 30\n")
        urls = [delayed.url(f"/img/{i}.jpg") for i in range(3)] + [busy.url("/busy/1/1/a.jpg")]
        rows = run(tmp_path, urls, "max_crawl_delay: 0.5, host_max_rate: null, backoff_retries: 0")
        assert [rows[u]["status"] for u in urls] == ["success"] * 3 + ["failed_to_download"]
        starts = sorted(t for p, ts in delayed.arrivals.items() if p.startswith("/img/") for t in ts)
        # one request per 0.5 s (the cap), not per 30 s (the site's wish, beyond max_crawl_delay)
        assert 2 * 0.5 * 0.8 <= starts[-1] - starts[0] < 20
        assert busy.hits["/busy/1/1/a.jpg"] == 1 and "429" in rows[urls[-1]]["error_message"]


def test_a_gate_sent_to_download_processes_is_one_per_process():
    """img2dataset's process pool gets the downloader pickled per task: the tasks one process runs share
    one gate (its robots.txt cache and host limits), which begins the sender's shard."""
    gate = HostGate(Manners(user_agent="x", token="x"), UrlPolicy(), key="test-gate-per-process")
    gate.begin_shard(7)
    a, b = pickle.loads(pickle.dumps(gate)), pickle.loads(pickle.dumps(gate))
    assert a is b and a is not gate and a.manners == gate.manners and a.shard == 7


def test_dns_answers_are_cached_per_worker():
    gate = HostGate(Manners(user_agent="x", token="x"), UrlPolicy())
    first = gate.resolve("localhost", 80)
    assert gate.resolve("localhost", 80) is first


def test_crawl_params_are_checked_with_their_keys(tmp_path, capsys):
    urls = ["http://127.0.0.2/a.jpg"]
    for params, keys in (
        (
            "host_max_rate: 0, host_max_concurrent: 0, max_retry_after: -1, host_max_failures: 0",
            ("host_max_rate", "host_max_concurrent", "max_retry_after", "host_max_failures"),
        ),
        ("optouts_unreachable: maybe", ("optouts_unreachable",)),
        (
            "user_agent_token: 'bad token/1', contact_url: 'https://x.test/a b\\r\\nX-Evil: 1'",
            ("user_agent_token", "contact_url"),
        ),
    ):
        assert main(["validate", str(write_config(tmp_path, urls, params))]) == 2
        err = capsys.readouterr().err
        assert err.startswith("curate: error:") and "Traceback" not in err
        for key in keys:
            assert f"download.{key}" in err or f"{key}:" in err, (key, err)


@pytest.mark.slow
def test_sigkill_mid_download_then_resume_keeps_opt_out_statuses(tmp_path):
    with sites(2, hang_seconds=60) as (a, b):
        a.responses["/robots.txt"] = robots("User-agent: *\nDisallow: /private/\n")
        paths = [(a, "/img/k0.jpg"), (a, "/private/k1.jpg"), (b, "/img/k2.jpg"), (b, "/img/k3.jpg")]
        paths += [(a, "/hang/k4.jpg"), (a, "/private/k5.jpg"), (b, "/img/k6.jpg"), (b, "/img/k7.jpg")]
        urls = [s.url(p) for s, p in paths]
        cfg = write_config(tmp_path, urls, "timeout: 30, total_timeout: 60", rows_per_shard=4)
        kill_run_at_hanging_url(cfg, a.hanging)
        assert [p.name for p in (tmp_path / "out" / "ledger").glob("shard-*.json")] == ["shard-00000.json"]
        a.release.set()
        assert main(["run", str(cfg)]) == 0
        rows = rows_by_url(tmp_path, urls)
        assert [rows[u]["status"] for u in urls] == ["success", "robots", "success", "success"] * 2
        assert a.hits["/img/k0.jpg"] == 1 and a.hits["/hang/k4.jpg"] == 2  # the finished shard stayed
        assert a.hits["/private/k1.jpg"] == a.hits["/private/k5.jpg"] == 0


RAY_DRIVER = """
import sys, json
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from curation.cli import main
from tests.imageserver import ImageServer
tmp = Path(sys.argv[1])
with ImageServer(host="127.0.0.2") as a, ImageServer(host="127.0.0.3") as b:
    a.responses["/robots.txt"] = (200, {}, b"User-agent: *\\nDisallow: /private/\\n")
    b.responses["/robots.txt"] = (503, {}, b"")
    urls = [a.url(f"/img/{i}.jpg") for i in range(6)] + [a.url("/private/x.jpg"), b.url("/img/y.jpg")]
    urls += [a.url("/busy/1/1/z.jpg"), a.url("/fail/w.jpg")]
    pq.write_table(pa.table({"url": urls, "caption": ["A dog runs on the beach."] * len(urls)}), tmp / "p.parquet")
    (tmp / "c.yaml").write_text(
        f"input: {{path: {tmp / 'p.parquet'}, rows_per_shard: 5}}\\noutput: {tmp / 'ray'}\\n"
        "runner: {workers: 1, progress: false}\\n"
        "stages:\\n  - download: {timeout: 2, thread_count: 4, allow_private_addresses: true}\\n"
    )
    cfg = str(tmp / "c.yaml")
    print("RAY", main(["run", cfg, "--runner", "ray", "--workers", "2"]), flush=True)
    print("LOCAL", main(["run", cfg, "-o", str(tmp / "local"), "--runner", "local"]), flush=True)
    print("ROBOTS", json.dumps([a.hits["/robots.txt"], b.hits["/robots.txt"]]), flush=True)
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(NETNS is None, reason="cannot create a network namespace; Ray must stay on loopback")
def test_ray_runner_gives_the_local_runners_opt_out_statuses(tmp_path):
    from tests.test_ray_runner import SESSION_TOKEN

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SESSION_TOKEN, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run(
        [*NETNS, sys.executable, "-c", RAY_DRIVER, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "RAY 0" in proc.stdout and "LOCAL 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    ray = pq.read_table(tmp_path / "ray" / "manifests").sort_by("uid")
    local = pq.read_table(tmp_path / "local" / "manifests").sort_by("uid")
    same = ["uid", "url", "status", "drop_reason", "sha256"]
    assert ray.select(same).equals(local.select(same))
    statuses = dict(zip(local.column("url").to_pylist(), local.column("status").to_pylist()))
    assert sorted(statuses.values()).count("success") == 7  # six images and the 429 retried
    assert [s for u, s in statuses.items() if "private" in u or "127.0.0.3" in u] == ["robots", "robots"]
