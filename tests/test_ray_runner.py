"""The Ray runner against real Ray: same output as the local runner, resume, failures, clusters.

Ray 2.60 binds to the host's network address (not loopback) and turns token
auth on. Every Ray process these tests start runs inside a private network
namespace (`unshare -n`, loopback only), so no Ray port is ever reachable from
outside this machine; the token is a random one passed in the environment
(nothing is written to ~/.ray). Processes are started in their own session and
stopped by their own process-group ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from tests.helpers import netns_prefix
from tests.test_stats import assert_same as assert_same_stats

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "laion_captions_1k.parquet"
CAPTIONS = "  - caption_complexity: {min: 2}\n  - caption_action: {min: 1}\n"


NETNS = netns_prefix()
needs_netns = pytest.mark.skipif(
    NETNS is None, reason="cannot create a network namespace (unshare -n / -rn); Ray must stay on loopback"
)
pytestmark = [pytest.mark.ray]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # Token auth stays on, with a token that lives only in these processes' environment.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=SESSION_TOKEN)
    # Ray Data's usage stats and its dashboard would only slow the tests down.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_RECORD_ACTOR_TASK_LOGGING="0")
    return env


SESSION_TOKEN = secrets.token_hex(32)

# Runs `curation.cli.main(argv)` for each command line given, in one process,
# with the test stages registered. Pseudo-commands between runs: `ray-init N`
# starts a local Ray instance advertising N (logical) GPUs, which the runs
# after it reuse (so the GPU pool path runs on a GPU-less machine); `rm FILE`;
# `check OUT` prints the ledger and the file identities of an output.
DRIVER = textwrap.dedent(
    r"""
    import os, sys
    import tests.ray_stages  # noqa: F401  registers the test stages
    from curation.cli import main
    import json, pathlib
    for line in sys.argv[1:]:
        cmd, *args = line.split()
        if cmd == "ray-init":
            import ray
            ray.init(address="local", num_cpus=2, num_gpus=int(args[0]), include_dashboard=False, log_to_driver=False)
        elif cmd == "rm":
            os.unlink(args[0])
        elif cmd == "check":
            out = pathlib.Path(args[0])
            ids = {p.name: [p.stat().st_ino, p.stat().st_mtime_ns] for p in (out / "manifests").glob("*.parquet")}
            done = sorted(int(p.name[6:11]) for p in (out / "ledger").glob("shard-?????.json"))
            failed = sorted(int(p.name[6:11]) for p in (out / "ledger").glob("*.failed.json"))
            print("CHECK\n" + json.dumps({"done": done, "failed": failed, "files": ids}), flush=True)
        else:
            print(f"RC={main([cmd, *args])}", flush=True)
    """
)


def curate(*runs: list[str], netns: bool = True, timeout: float = 240):
    """Run one or more `curate` command lines in one driver process (one Ray session)."""
    cmd = [sys.executable, "-c", DRIVER, *(" ".join(r) for r in runs)]
    if netns:
        cmd = [*NETNS, *cmd]
    env = _env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    _reap_zombies()
    codes = [int(line[3:]) for line in proc.stdout.splitlines() if line.startswith("RC=")]
    return proc, codes


def make_input(tmp: Path, copies: int = 1) -> Path:
    """The bundled 1k LAION captions, replicated with distinct URLs so every uid is unique."""
    t = pq.read_table(DEMO, columns=["URL", "TEXT"])
    parts = [
        t.set_column(0, "URL", pa.array([f"{u}#{k}" for u in t.column(0).to_pylist()])) for k in range(copies)
    ]
    path = tmp / f"captions_{copies}k.parquet"
    pq.write_table(pa.concat_tables(parts), path, row_group_size=1000)
    return path


def write_config(
    tmp: Path, name: str, data: Path, *, rows_per_shard: int, stages: str = CAPTIONS, runner: str = ""
) -> Path:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(
        f"input: {{path: {data}, url_column: URL, caption_column: TEXT, rows_per_shard: {rows_per_shard}}}\n"
        f"output: {tmp / name}\n"
        f"runner: {{progress: false, batch_rows: 100{runner}}}\n"
        f"stages:\n{stages}"
    )
    return cfg


def manifests(out: Path) -> pa.Table:
    return pq.read_table(out / "manifests").sort_by("uid")


def ledger(out: Path) -> dict[int, dict]:
    return {
        json.loads(p.read_text())["shard"]: json.loads(p.read_text())
        for p in (out / "ledger").glob("shard-?????.json")
    }


def file_ids(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "manifests").glob("*.parquet")}


def assert_same_rows(a: pa.Table, b: pa.Table) -> None:
    assert a.num_rows == b.num_rows
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    assert len(set(a.column("uid").to_pylist())) == a.num_rows  # no row twice
    assert a.schema == b.schema
    assert a.equals(b), "scores or decisions differ between runners"


# ---------------------------------------------------------------------------- default tests


@pytest.fixture(scope="module")
def gpu_less_session(tmp_path_factory) -> dict:
    """The caption pipeline on a Ray instance the runner starts itself, then a GPU stage on a GPU-less one."""
    if NETNS is None:
        pytest.skip("cannot create a network namespace (unshare -n / -rn); Ray must stay on loopback")
    tmp = tmp_path_factory.mktemp("gpu_less")
    caps = write_config(tmp, "caps", DEMO, rows_per_shard=250)
    gpu = write_config(tmp, "gpu", DEMO, rows_per_shard=250, stages=CAPTIONS + "  - test_chars: {gpus: 1}\n")
    proc, codes = curate(
        ["run", str(caps), "--runner", "ray"],
        ["ray-init", "0"],  # explicit: a CI machine with GPUs must still look GPU-less here
        ["run", str(gpu), "--runner", "ray"],
    )
    return {"tmp": tmp, "caps": caps, "proc": proc, "codes": codes}


@needs_netns
def test_ray_runner_matches_local_runner(gpu_less_session: dict, capsys) -> None:
    tmp, proc, codes = gpu_less_session["tmp"], gpu_less_session["proc"], gpu_less_session["codes"]
    assert codes[:1] == [0], proc.stderr[-3000:]
    assert "4 shard(s) written" in proc.stdout
    # Ray's notices that are not the user's concern: token auth is on; no route to 8.8.8.8 (offline,
    # as in this network namespace) to find the node's address, which a local instance never needs.
    assert "Token authentication" not in proc.stderr
    assert "8.8.8.8" not in proc.stderr and "external connectivity" not in proc.stderr
    ray_out, local = tmp / "caps", tmp / "local"
    assert main(["run", str(gpu_less_session["caps"]), "-o", str(local), "--workers", "1"]) == 0
    assert_same_rows(manifests(ray_out), manifests(local))
    assert {k: v["rows"] for k, v in ledger(ray_out).items()} == {0: 250, 1: 250, 2: 250, 3: 250}
    assert not [p for p in (ray_out / "manifests" / ".tmp").rglob("*") if not p.is_dir()]
    for command in ("status", "stats"):
        assert main([command, str(ray_out)]) == 0
    # the Ray driver folded the shards' summaries (read back from the store) into one object, and
    # the stats they give are those of the manifests, and of the local run
    assert json.loads((ray_out / "summaries" / "folded.json").read_text())["shards"] == [[0, 3]]
    capsys.readouterr()
    got = {}
    for name, out, extra in (("ray", ray_out, []), ("exact", ray_out, ["--exact"]), ("local", local, [])):
        assert main(["stats", str(out), "--format", "json", *extra]) == 0
        got[name] = json.loads(capsys.readouterr().out)
    assert got["ray"] == got["local"] and got["ray"]["source"] == "summaries"
    assert_same_stats(got["ray"], got["exact"])


@needs_netns
def test_gpu_stage_on_gpu_less_cluster_fails_before_any_work(gpu_less_session: dict) -> None:
    tmp, proc, codes = gpu_less_session["tmp"], gpu_less_session["proc"], gpu_less_session["codes"]
    assert codes[1:] == [2], proc.stderr[-3000:]
    assert "stage(s) test_chars need 1 GPU(s) per worker, but the Ray cluster has no GPU" in proc.stderr
    assert not list((tmp / "gpu" / "manifests").glob("*.parquet"))
    assert not list((tmp / "gpu" / "ledger").iterdir())


@pytest.fixture
def test_stages():
    """The test stages registered in this process for one test, then removed again."""
    from curation.stages import STAGES

    saved = dict(STAGES)
    import tests.ray_stages  # noqa: F401

    sys.modules.pop("tests.ray_stages")  # re-registers on the next import
    yield
    STAGES.clear(), STAGES.update(saved)


@needs_netns
def test_gpu_pool_shard_failure_and_retry_of_only_that_shard(tmp_path: Path, test_stages) -> None:
    """Two actor pools (captions on CPU, a GPU stage on a logical GPU); one shard fails, a re-run fixes it."""
    flag = tmp_path / "fail.flag"
    stages = CAPTIONS + "  - test_chars: {gpus: %s, fail_flag: %s, poison_uid: '%s'}\n"
    # Local references declare no GPU (the local runner refuses GPU stages on a
    # GPU-less machine); `gpus` changes where the stage runs, not what it computes.
    # The poisoned row must be one the cascaded GPU stage sees: one the caption stages keep.
    ref = write_config(tmp_path, "ref", DEMO, rows_per_shard=250, stages=stages % (0, flag, "none"))
    assert main(["run", str(ref), "--workers", "1", "--no-progress"]) == 0
    t = manifests(tmp_path / "ref")
    poison = t.filter(pc.and_(t.column("keep"), pc.equal(t.column("shard"), 2))).column("uid")[0].as_py()

    local_cfg = write_config(tmp_path, "local", DEMO, rows_per_shard=250, stages=stages % (0, flag, poison))
    trace = tmp_path / "trace.txt"  # the GPU pool's actors note their setup and teardown there
    traced = (stages % (0.5, flag, poison)).replace("{gpus", f"{{trace: {trace}, gpus")
    cfg = write_config(tmp_path, "run", DEMO, rows_per_shard=250, stages=traced)
    local = tmp_path / "local"
    assert main(["run", str(local_cfg), "--workers", "1", "--no-progress"]) == 0

    flag.touch()
    out = tmp_path / "ray"
    run = ["run", str(cfg), "-o", str(out), "--runner", "ray"]
    proc, codes = curate(["ray-init", "1"], run, ["check", str(out)], ["rm", str(flag)], run)
    assert codes == [1, 0], proc.stderr[-3000:]
    assert "shard 2 failed: RuntimeError: poisoned row" in proc.stderr
    first, second = proc.stdout.split("CHECK")
    assert "3 shard(s) written, 0 already done, 1 failed" in first
    state = json.loads(second.split("\n", 1)[1].split("\n", 1)[0])
    assert state["done"] == [0, 1, 3] and state["failed"] == [2]
    assert "1 shard(s) written, 3 already done" in second
    assert not (out / "ledger" / "shard-00002.failed.json").exists()
    after = file_ids(out)
    assert {k: after[k] for k in state["files"]} == {k: tuple(v) for k, v in state["files"].items()}
    assert_same_rows(manifests(out), manifests(local))
    assert manifests(out).column("test_chars").null_count > 0  # rows the cascade skipped
    # Ray Data ends its actors gracefully: each one tore its stages down, the one with the failed shard too.
    events = [line.split() for line in trace.read_text().splitlines()]
    actors = {pid for event, pid in events if event == "setup"}
    assert actors and {pid for event, pid in events if event == "teardown"} == actors


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:{port}", "cannot reach the Ray cluster at runner.address='127.0.0.1:{port}'"),
        ("ray://127.0.0.1:{port}", "cannot reach the Ray cluster"),
        ("not-an-address", "is not an address"),
    ],
)
def test_unreachable_address_fails_fast(tmp_path: Path, capsys, address: str, message: str) -> None:
    port = _closed_port()
    address, message = address.format(port=port), message.format(port=port)
    cfg = write_config(tmp_path, "run", DEMO, rows_per_shard=250, runner=f", type: ray, address: '{address}'")
    started = time.monotonic()
    assert main(["run", str(cfg)]) == 2
    assert time.monotonic() - started < 15
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "run" / "manifests").glob("*.parquet"))


def test_laion_config_validates(tmp_path: Path, capsys) -> None:
    """pipelines/laion.yaml against a file with LAION-2B-en's columns (the real metadata is not here)."""
    import yaml

    laion = pa.table(
        {
            "URL": ["https://example.com/a.jpg"],
            "TEXT": ["a dog runs on the beach"],
            "WIDTH": [640.0],
            "HEIGHT": [480.0],
            "similarity": [0.31],
            "hash": [123456789],
            "punsafe": pa.array([0.01], pa.float32()),
            "pwatermark": pa.array([0.2], pa.float32()),
        }
    )
    pq.write_table(laion, tmp_path / "part-00000.parquet")
    cfg = yaml.safe_load((ROOT / "pipelines" / "laion.yaml").read_text())
    cfg["input"]["path"] = str(tmp_path / "part-*.parquet")
    cfg["output"] = str(tmp_path / "out")
    (tmp_path / "laion.yaml").write_text(yaml.safe_dump(cfg))
    # its hash blocklists are the team's own (not public): refused until they exist
    assert main(["validate", str(tmp_path / "laion.yaml"), "--set", "runner.address=null"]) == 2
    assert "cannot read lists/md5.txt" in capsys.readouterr().err
    [lists] = [s["hash_blocklist"] for s in cfg["stages"] if "hash_blocklist" in s]
    (tmp_path / "md5.txt").write_text("d41d8cd98f00b204e9800998ecf8427e\n")
    (tmp_path / "pdq.txt").write_text("f" * 64 + ",100\n")
    (tmp_path / "domains.txt").write_text("blocked.example\n")
    for kind in ("md5", "pdq", "domain"):
        lists[kind] = [str(tmp_path / Path(p).name) for p in lists[kind]]
    (tmp_path / "laion.yaml").write_text(yaml.safe_dump(cfg))
    # address: auto joins a cluster started here; this machine runs none, so validate needs null
    assert main(["validate", str(tmp_path / "laion.yaml"), "--set", "runner.address=null"]) == 0


# ---------------------------------------------------------------------------- slow tests


def _become_subreaper() -> None:
    """Orphans of the Ray trees we kill become our children, so we can reap them.

    Otherwise they are re-parented to PID 1, which in a container often never
    reaps, and linger as zombies.
    """
    import ctypes

    pr_set_child_subreaper = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _reap_zombies() -> None:
    """Reap exited children of this process (and only those): orphaned Ray daemons."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state == "Z" and int(ppid) == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


@pytest.fixture(autouse=True, scope="module")
def _reaper():
    _become_subreaper()
    yield
    time.sleep(0.5)  # daemons of the last driver exit just after it
    _reap_zombies()


def _start(cmd: list[str], **kw) -> subprocess.Popen:
    # Own session: the whole tree (driver, raylet, workers) is one process group to stop by its id.
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, start_new_session=True, **kw)


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=30)
    # Ray daemons leave the group by design (their own sessions); they share the
    # run's private net ns, so those are found by it and stopped by their ids,
    # again until none is left (a raylet may start a worker while we look).
    ns = proc_ns_of_children.get(proc.pid)
    for _ in range(50):
        left = _pids_in_netns(ns)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    else:
        raise AssertionError(f"processes left in the test's network namespace: {_pids_in_netns(ns)}")
    time.sleep(0.2)
    _reap_zombies()


proc_ns_of_children: dict[int, str] = {}


def _netns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _pids_in_netns(ns: str | None) -> list[int]:
    if ns is None or ns == _netns_of(os.getpid()):
        return []  # never touch processes of this (the host's) namespace
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _netns_of(int(p)) == ns]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _start_in_netns(argv: list[str]) -> subprocess.Popen:
    proc = _start(
        [*NETNS, sys.executable, "-c", DRIVER, " ".join(argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The driver's net ns, read once it exists: how the test finds every process of this run.
    proc_ns_of_children[proc.pid] = _wait_for(
        lambda: (ns := _netns_of(proc.pid)) != _netns_of(os.getpid()) and ns, 10, "the namespace"
    )
    return proc


@pytest.mark.slow
@needs_netns
def test_driver_killed_mid_run_then_resume(tmp_path: Path) -> None:
    data = make_input(tmp_path, copies=4)
    cfg = write_config(tmp_path, "run", data, rows_per_shard=100)  # 40 shards
    out = tmp_path / "run"
    proc = _start_in_netns(["run", str(cfg), "--runner", "ray", "--workers", "2"])
    try:
        _wait_for(lambda: len(ledger(out)) >= 5, 180, "5 finished shards")
    finally:
        _stop_group(proc)  # SIGKILL: the driver gets no chance to clean up
    done_before = ledger(out)
    assert 5 <= len(done_before) < 40, "the run finished before it could be killed"
    files_before = {k: v for k, v in file_ids(out).items()}

    proc, codes = curate(["run", str(cfg), "--runner", "ray", "--workers", "2"])
    assert codes == [0], proc.stderr[-3000:]
    done_after = ledger(out)
    written, already = (
        int(x) for x in re.search(r"(\d+) shard\(s\) written, (\d+) already done", proc.stdout).groups()
    )
    # >=: a shard renamed into place just before the kill, without its ledger entry, is adopted
    assert written + already == 40 and already >= len(done_before)
    assert set(done_after) == set(range(40))
    after = file_ids(out)
    assert {k: after[k] for k in files_before} == files_before  # not one finished file rewritten
    t = manifests(out)
    assert t.num_rows == 4000 and len(set(t.column("uid").to_pylist())) == 4000
    assert not [p for p in (out / "manifests" / ".tmp").rglob("*") if not p.is_dir()]


@pytest.mark.slow
@needs_netns
def test_kill_9_of_the_driver_alone_ends_the_whole_ray_job(tmp_path: Path) -> None:
    """Only the driver is killed. Ray's fate sharing ends the rest: the GCS and raylet it started die
    with it, the workers with the raylet, Ray's per-node agents after their own timeout. Nothing is
    left running, and the run resumes to exactly every row once."""
    data = make_input(tmp_path, copies=4)
    cfg = write_config(tmp_path, "run", data, rows_per_shard=100)  # 40 shards
    out = tmp_path / "run"
    proc = _start_in_netns(["run", str(cfg), "--runner", "ray", "--workers", "2"])
    ns = proc_ns_of_children[proc.pid]
    try:
        _wait_for(lambda: len(ledger(out)) >= 3, 180, "3 finished shards")
        running = _pids_in_netns(ns)
        assert any("raylet" in _cmdline(p) for p in running), [_cmdline(p) for p in running]
        assert any("MapBatches(_ShardWorker)" in _cmdline(p) for p in running)
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone, by its id
        proc.wait()
        dead_at = time.monotonic()

        seen: dict[str, float] = {}

        def ended() -> bool:
            # Ray's workers poll whether their raylet's pid is alive, and a zombie counts as alive:
            # reap the dead daemons (re-parented to this process, the subreaper) as an init would.
            _reap_zombies()
            left = [_cmdline(p) for p in _pids_in_netns(ns)]
            if not any("MapBatches" in c for c in left):
                seen.setdefault("workers", time.monotonic() - dead_at)
            return not left

        _wait_for(ended, 180, "every Ray process of the job to end", poll=0.1)
        # Measured figures for docs/ray.md (pytest -s shows them).
        print(
            f"ray: shard workers gone {seen['workers']:.1f} s and all {len(running)} processes "
            f"{time.monotonic() - dead_at:.1f} s after the driver died"
        )
    finally:
        _stop_group(proc)
    done = ledger(out)
    assert 3 <= len(done) < 40, "the run finished before it could be killed"

    proc, codes = curate(["run", str(cfg), "--runner", "ray", "--workers", "2"])
    assert codes == [0], proc.stderr[-3000:]
    t = manifests(out)
    assert t.num_rows == 4000 and len(set(t.column("uid").to_pylist())) == 4000
    assert set(ledger(out)) == set(range(40))


@pytest.mark.slow
@needs_netns
def test_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    data = make_input(tmp_path, copies=4)
    cfg = write_config(tmp_path, "run", data, rows_per_shard=100)
    out = tmp_path / "run"
    proc = _start_in_netns(["run", str(cfg), "--runner", "ray", "--workers", "2"])
    ns = proc_ns_of_children[proc.pid]
    try:
        _wait_for(lambda: len(ledger(out)) >= 3, 180, "3 finished shards")
        workers = [p for p in _pids_in_netns(ns) if "MapBatches(_ShardWorker)" in _cmdline(p)]
        assert workers, "no Ray Data actor process found"
        os.kill(workers[0], signal.SIGKILL)  # a real signal to a real worker process, mid-run
        killed_at = len(ledger(out))
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        _stop_group(proc)
    assert killed_at < 40, "the run finished before the worker could be killed"
    assert "RC=0" in stdout, stderr[-3000:]
    t = manifests(out)
    assert t.num_rows == 4000 and len(set(t.column("uid").to_pylist())) == 4000
    assert set(ledger(out)) == set(range(40))
    assert sum(e["rows"] for e in ledger(out).values()) == 4000


@pytest.mark.slow
@needs_netns
def test_two_node_cluster(tmp_path: Path) -> None:
    """`ray start --head` + `ray start --address` (two raylets: two nodes) on loopback; the run joins it."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = 6379
    data = make_input(tmp_path, copies=2)
    cfg = write_config(
        tmp_path, "run", data, rows_per_shard=100, runner=f", type: ray, address: '127.0.0.1:{port}'"
    )
    # A private Ray temp dir (never mixes with another Ray on this machine), short
    # because Ray puts Unix sockets in it (107-byte limit on their paths).
    temp = Path(tempfile.mkdtemp(prefix="curate-ray-"))
    # One namespace for the whole cluster: a holder process that the nodes and the driver join.
    holder = _start([*NETNS, "sleep", "600"])
    ns = _wait_for(lambda: (n := _netns_of(holder.pid)) != _netns_of(os.getpid()) and n, 10, "the namespace")
    proc_ns_of_children[holder.pid] = ns
    enter = ["nsenter", f"--net=/proc/{holder.pid}/ns/net"]
    nodes: list[subprocess.Popen] = []
    try:
        common = ["--num-cpus=1", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        head = [
            *enter,
            ray_bin,
            "start",
            "--head",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            *common,
        ]
        nodes.append(_start(head, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for(lambda: _port_open(holder.pid, port), 60, "the head's GCS")
        worker = [*enter, ray_bin, "start", f"--address=127.0.0.1:{port}", *common]
        nodes.append(_start(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_nodes = (
            f"import ray, time; ray.init(address='127.0.0.1:{port}', log_to_driver=False)\n"
            "while len([n for n in ray.nodes() if n['Alive']]) < 2: time.sleep(0.2)"
        )
        subprocess.run([*enter, sys.executable, "-c", wait_nodes], env=_env(), timeout=120, check=True)

        driver = [*enter, sys.executable, "-c", DRIVER, f"run {cfg}"]
        proc = subprocess.run(driver, capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
        assert "RC=0" in proc.stdout, proc.stderr[-3000:]
        assert "ray: 2 node(s), 2 CPU(s)" in proc.stderr
        assert "ray: shards per node:" in proc.stderr  # both nodes took shards
        t = manifests(tmp_path / "run")
        assert t.num_rows == 2000 and len(set(t.column("uid").to_pylist())) == 2000
    finally:
        for node in reversed(nodes):
            _stop_group(node)
        _stop_group(holder)  # and every process left in the cluster's namespace, by its id
        shutil.rmtree(temp, ignore_errors=True)


def _port_open(holder_pid: int, port: int) -> bool:
    probe = [
        "nsenter",
        f"--net=/proc/{holder_pid}/ns/net",
        sys.executable,
        "-c",
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
    ]
    return subprocess.run(probe, capture_output=True).returncode == 0


@needs_netns
def test_null_address_starts_a_fresh_instance_and_never_joins_a_running_one(tmp_path: Path) -> None:
    """`connect(None)` (used by `curate run` and `curate mine`) beside a running head that
    RAY_ADDRESS points at: it must start its own instance, not join that one."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = Path(tempfile.mkdtemp(prefix="curate-ray-"))
    probe = (
        "import ray; from curation.core.cluster import connect\n"
        "owned = connect(None, 1)\n"
        "print('OWNED', owned, 'GCS', ray.get_runtime_context().gcs_address,"
        " 'CPUS', ray.cluster_resources().get('CPU'))\n"
        "ray.shutdown()\n"
    )
    script = (
        f"{ray_bin} start --head --port=6390 --num-cpus=3 --temp-dir={temp} --include-dashboard=false "
        "--disable-usage-stats --node-ip-address=127.0.0.1 >/dev/null 2>&1 || exit 3\n"
        f'RAY_ADDRESS=127.0.0.1:6390 {sys.executable} -c "$PROBE"; rc=$?\n'
        f"{ray_bin} stop --force >/dev/null 2>&1\n"
        "exit $rc\n"
    )
    env = {**_env(), "PROBE": probe}
    try:
        proc = subprocess.run(
            [*NETNS, "sh", "-c", script], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
        )
    finally:
        _reap_zombies()
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"OWNED (\S+) GCS (\S+) CPUS (\S+)", proc.stdout)
    assert found, proc.stdout + proc.stderr[-2000:]
    owned, gcs, cpus = found.groups()
    assert owned == "True"
    assert not gcs.endswith(":6390"), f"joined the running head at {gcs}"
    assert float(cpus) == 1.0
