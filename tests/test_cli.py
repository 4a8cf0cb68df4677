"""The CLI layer: one error line, one overwrite rule, hostile `--where`, unwritable outputs,
manifest rows that name other hosts, DataComp's uid file, help texts.

Everything real: a run over a real webdataset tar, real DuckDB, a real read-only and a real
full filesystem (tmpfs in a private mount namespace), a real TCP listener on 127.0.0.1.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.cli import main
from curation.cli.common import clean
from tests.helpers import REPO
from tests.imageserver import jpeg

CAPTIONS = [
    "A man rides a red bicycle down the street.",
    "A woman walks her dog in the park.",
    "A child throws a ball across the grass.",
    "The chef cooks dinner in a busy kitchen.",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A webdataset input of 4 real JPEG pairs, scored (2 shards)."""
    tmp = tmp_path_factory.mktemp("cli")
    tar_path = tmp / "in" / "part-0.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for i, caption in enumerate(CAPTIONS):
            for name, payload in ((f"{i:03d}.jpg", jpeg(str(i))), (f"{i:03d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"""input: {{format: webdataset, path: "{tar_path}", rows_per_shard: 2}}
output: {tmp / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_complexity: {{min: 1}}
"""
    )
    assert main(["run", str(cfg)]) == 0
    return tmp / "run"


def curate(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "curation.cli", *args]
    return subprocess.run((prefix or []) + cmd, capture_output=True, text=True, env=env, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("curate: error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------- one CLI layer


def test_only_the_cli_package_parses_prints_errors_and_exits():
    """argparse, `curate: error:` and exit codes live in curation/cli/ alone."""
    offenders = []
    for folder in ("curation", "train"):
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            # argtypes: the argparse types the CLI uses.
            if rel.startswith("curation/cli/") or rel == "curation/cli/argtypes.py":
                continue
            text = path.read_text()
            if 'prog="python -m ' in text:  # a data-preparation script (train.fashion_mnist), not a command
                continue
            for pattern in ("import argparse", "curate: error", "EXIT_USAGE", "add_parser(", '"error: '):
                if pattern in text:
                    offenders.append(f"{rel}: {pattern}")
    assert not offenders, offenders


def test_error_line_escapes_control_characters_and_never_shows_unsafe_advice():
    assert clean("bad \x1b[31mred\x1b[0m\nsecond line") == "bad \\x1b[31mred\\x1b[0m second line"
    torch = pytest.importorskip("torch")

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    buf = io.BytesIO()
    torch.save({"model": Payload()}, buf)
    buf.seek(0)
    with pytest.raises(Exception) as e:
        torch.load(buf, weights_only=True)
    assert "weights_only" in str(e.value)  # torch's advice is there ...
    line = clean(f"model.pt: {e.value}")
    assert "weights_only" not in line and "False" not in line and "\n" not in line  # ... and never shown
    assert line.startswith("model.pt: ") and "pickle payload" in line


def test_control_characters_in_the_output_path_are_escaped(run, tmp_path):
    out = tmp_path / "uids\x1b[2J.parquet"
    proc = curate("select", str(run), "--uids-only", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "uids\\x1b[2J.parquet" in proc.stdout


# ---------------------------------------------------------------------------- one overwrite rule


@pytest.mark.parametrize(
    "command",
    [
        ["query", "{run}", "SELECT uid FROM samples", "--out", "{out}.parquet"],
        ["select", "{run}", "--uids-only", "--out", "{out}.parquet"],
        ["select", "{run}", "--out", "{out}"],
        ["report", "{run}", "--sample", "1", "--out", "{out}.html"],
    ],
    ids=["query", "select-uids", "select-shards", "report"],
)
def test_every_command_refuses_an_existing_output_unless_force(run, tmp_path, command):
    argv = [a.format(run=run, out=tmp_path / "o") for a in command]
    out = Path(argv[argv.index("--out") + 1])
    if out.suffix:
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    assert "exists" in one_error_line(curate(*argv))
    assert (out.read_text() if out.suffix else (out / "keep.txt").read_text()) == "precious"
    proc = curate(*argv, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (
        (out.stat().st_size > 0 and out.read_bytes() != b"precious")
        if out.suffix
        else (out / "sizes.json").exists()
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# ---------------------------------------------------------------------------- hostile --where


@pytest.mark.parametrize("where", ["keep) --", "keep /*", "keep) OR (1=1", "keep; SELECT 1"])
def test_a_where_that_escapes_its_parentheses_is_one_error_line(run, tmp_path, where):
    for command in (
        ["report", str(run), "--where", where, "--out", str(tmp_path / "r.html")],
        ["select", str(run), "--where", where, "--uids-only", "--out", str(tmp_path / "u.parquet")],
    ):
        proc = curate(*command)
        if where == "keep) OR (1=1":  # balanced: a valid condition, which selects like one
            assert proc.returncode == 0, proc.stderr
            continue
        assert "--where" in one_error_line(proc)
    assert not (tmp_path / "u.parquet").exists() or where == "keep) OR (1=1"


# ---------------------------------------------------------------------------- unwritable or full output


def _mount_prefix(folder: Path, *, size: str, read_only: bool) -> list[str] | None:
    """Run a command with a fresh tmpfs of `size` mounted on `folder` (read-only, or full), in a
    private mount namespace; None where this machine cannot make one."""
    if not shutil.which("unshare"):
        return None
    fill = f"head -c {size} /dev/zero > {folder}/fill 2>/dev/null;"  # what does not fit: a full disk
    script = f"mount -t tmpfs -o size={size} tmpfs {folder} && {fill} " + (
        f"mount -o remount,ro {folder} && " if read_only else ""
    )
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", script + "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    # The command's stdout is silenced; what stdout shows is the mount's content after it ran.
    run_then_list = f'"$@" >/dev/null; rc=$?; cd {folder} && find . -type f; exit $rc'
    return ["unshare", "-rm", "sh", "-c", script + run_then_list, "mounted"]


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only", "full"])
def test_unwritable_or_full_output_is_one_error_line_and_leaves_nothing(run, tmp_path, read_only):
    target = tmp_path / "mnt"
    target.mkdir()
    prefix = _mount_prefix(target, size="256k", read_only=read_only)
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -rm)")
    expected = "Read-only file system" if read_only else "No space left on device"
    cases = [
        ["query", str(run), "SELECT * FROM samples", "--out", str(target / "q.parquet")],
        ["query", str(run), "SELECT * FROM samples", "--out", str(target / "q.csv")],
        ["select", str(run), "--uids-only", "--out", str(target / "u.parquet")],
        ["select", str(run), "--uids-only", "--out", str(target / "u.npy")],
        ["select", str(run), "--out", str(target / "shards")],
        ["report", str(run), "--out", str(target / "r.html")],
    ]
    if not read_only:  # a read-only output is refused by the config check (tested in test_config.py)
        cfg = tmp_path / "c.yaml"
        cfg.write_text((run.parent / "c.yaml").read_text().replace(str(run), str(target / "run")))
        cases.append(["run", str(cfg)])
    for argv in cases:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "curation.cli", *argv], capture_output=True, text=True, env=env
        )
        left = [f for f in proc.stdout.split() if f != "./fill"]  # the mount's files after the command
        assert proc.returncode == 2, (argv, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and expected in proc.stderr, (argv, proc.stderr)
        err_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("curate: error: ")]
        assert len(err_lines) == 1, proc.stderr
        if argv[0] == "run":  # finished shards stay (a re-run resumes); nothing temporary does
            assert not [f for f in left if "tmp" in f], left
        else:
            assert left == [], (argv, left)  # no temp file, no partial output


# ---------------------------------------------------------------------------- images from elsewhere


class Listener:
    """A TCP port on 127.0.0.1 that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.sock.settimeout(0.2)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.sock.close()


def test_select_and_report_never_open_a_host_a_manifest_row_names(run, tmp_path):
    listener = Listener()
    try:
        copy = tmp_path / "received"
        shutil.copytree(run, copy)
        # A run directory from someone else: its manifest rows point at hosts and at a file outside it.
        hostile = [
            f"ftp://127.0.0.1:{listener.port}/x.tar",
            f"http://127.0.0.1:{listener.port}/x.tar",
            "/etc/passwd",
        ]
        manifests = sorted((copy / "manifests").glob("shard-*.parquet"))
        table = pq.read_table(manifests[0])
        paths = table.column("image_path").to_pylist()
        paths[: len(hostile)] = hostile[: len(paths)]
        table = table.set_column(table.schema.get_field_index("image_path"), "image_path", [paths])
        pq.write_table(table, manifests[0])
        third = pq.read_table(manifests[1])
        p3 = third.column("image_path").to_pylist()
        p3[0] = hostile[2]
        pq.write_table(
            third.set_column(third.schema.get_field_index("image_path"), "image_path", [p3]), manifests[1]
        )

        proc = curate("select", str(copy), "--where", "true", "--out", str(tmp_path / "shards"))
        assert proc.returncode == 1, proc.stderr  # finished, the refused rows listed
        assert proc.stderr.count("refused") == 3, proc.stderr
        assert "network host" in proc.stderr and "outside the run" in proc.stderr
        assert "Traceback" not in proc.stderr
        sizes = (tmp_path / "shards" / "sizes.json").read_text()
        assert '"00000.tar": 1' in sizes  # the one row left reads from the run's own input

        proc = curate("report", str(copy), "--out", str(tmp_path / "r.html"))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "network host" in (tmp_path / "r.html").read_text()
    finally:
        listener.close()
    assert listener.connections == 0


# ---------------------------------------------------------------------------- DataComp's uid file


def test_uids_only_npy_is_datacomps_format_with_the_inputs_own_uid(tmp_path):
    import pyarrow as pa

    # DataComp's metadata: uid, url, text (its pools carry their own 128-bit uid).
    uids = [f"{i + 1:016x}{(i + 1) * 7:016x}" for i in range(len(CAPTIONS))]
    pq.write_table(
        pa.table({"uid": uids, "url": [f"http://x/{i}.jpg" for i in range(4)], "text": CAPTIONS}),
        tmp_path / "pool.parquet",
    )
    (tmp_path / "c.yaml").write_text(
        f"""input: {{format: parquet, path: "{tmp_path / "pool.parquet"}", caption_column: text}}
output: {tmp_path / "run"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_complexity: {{min: 1}}
"""
    )
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    run = tmp_path / "run"
    out = tmp_path / "subset.npy"
    assert main(["select", str(run), "--where", "keep", "--uids-only", "--out", str(out)]) == 0
    array = np.load(out)
    assert array.dtype == np.dtype("u8,u8")
    expected = sorted((i + 1, (i + 1) * 7) for i in range(len(CAPTIONS)))
    assert [tuple(int(v) for v in row) for row in array] == expected  # the input's uids, sorted
    parquet = tmp_path / "subset.parquet"
    assert main(["select", str(run), "--where", "keep", "--uids-only", "--out", str(parquet)]) == 0
    t = pq.read_table(parquet)
    assert t.column_names == ["uid", "input_uid"] and t.num_rows == len(CAPTIONS)


# ---------------------------------------------------------------------------- help


def test_help_describes_every_command_and_argument():
    from curation.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    assert "--few-shot" in top and "curate mine" in top
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            assert action.help, (name, action.dest)
        text = p.format_help()
        for dest, default in (("bins", "10"), ("seed", "0"), ("device", "auto")):
            if any(a.dest == dest for a in p._actions):
                assert re.search(rf"--{dest} .*\(default:? {default}\)", " ".join(text.split())), (name, dest)
    mine = sub.choices["mine"].format_help()
    # Each example on its own line: no shell continuation swallowed by the help string.
    assert "all-MiniLM-L6-v2 \\\n" in mine and "all-MiniLM-L6-v2       --output" not in mine


# ---------------------------------------------------------------------------- numbers people read


def test_slow_rates_are_not_rounded_to_zero():
    from curation.core.terminal import rate
    from curation.report.collect import ShardTiming
    from curation.report.page import _timings

    assert [rate(x) for x in (12345.6, 123.4, 12.34, 0.44, 0.0)] == ["12,346", "123", "12.3", "0.44", "0"]
    html = _timings([ShardTiming(0, 11, 5, 25.0, 0.0), ShardTiming(1, 34, 20, 77.3, 0.0)], None)
    assert "<td>25.00</td><td>0.44</td>" in html and "median (0.44-0.44)" in html  # was `0`


def test_progress_counts_whole_rows(tmp_path):
    from tests.helpers import LAION_1K, write_config

    cfg = write_config(tmp_path / "c.yaml", LAION_1K, tmp_path / "run", rows_per_shard=500)
    cfg.write_text(cfg.read_text().replace("progress: false", "progress: true"))
    returncode, stderr = on_a_terminal("run", str(cfg))  # the bar is drawn on a terminal only
    assert returncode == 0, stderr
    assert re.search(r"\b1000/1000 \[", stderr), stderr[-500:]
    assert not re.search(r"\d\.\d/\d", stderr)  # never `12.0/34.0`


def on_a_terminal(*args: str) -> tuple[int, str]:
    """`curate ARGS` with stderr on a pseudo-terminal (as a user at a shell sees it): exit code, stderr."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns, as a window has
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", *args], stderr=slave, stdout=subprocess.DEVNULL, env=env
    )
    os.close(slave)
    chunks = []
    while True:  # read as it comes: a full pty buffer would block the writer
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_input_columns_that_would_collide_are_refused_by_name(tmp_path):
    import pyarrow as pa

    pq.write_table(
        pa.table(
            {
                "url": ["http://x/1.jpg"],
                "caption": [CAPTIONS[0]],
                "image_path": ["a"],  # ours: carried as input_image_path ...
                "input_image_path": ["b"],  # ... which the input already has
            }
        ),
        tmp_path / "in.parquet",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"input: {{format: parquet, path: {tmp_path / 'in.parquet'}}}\noutput: {tmp_path / 'run'}\n"
        "stages:\n  - caption_complexity: {min: 1}\n"
    )
    proc = curate("run", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'image_path' and 'input_image_path'" in proc.stderr and "input_image_path_1" not in proc.stderr
    assert not (tmp_path / "run" / "manifests").exists()
    cfg.write_text(cfg.read_text().replace("format: parquet,", "format: parquet, columns: [image_path],"))
    assert curate("run", str(cfg)).returncode == 0
    [(names,)] = [(pq.read_schema(p).names,) for p in (tmp_path / "run" / "manifests").glob("*.parquet")]
    assert "input_image_path" in names and "input_image_path_1" not in names


def test_a_finished_run_prints_the_whole_runs_totals(run):
    proc = curate("run", str(run.parent / "c.yaml"))
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    assert "0 shard(s) written, 2 already done" in line
    assert line.endswith(f"the run holds {len(CAPTIONS)} rows, {len(CAPTIONS)} kept (100.0%)")


# ---------------------------------------------------------------------------- brace patterns in input.path


def _tars(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        with tarfile.open(folder / f"{k:05d}.tar", "w") as tar:
            for i, caption in enumerate(CAPTIONS[:2]):
                for name, payload in (
                    (f"{k}{i:03d}.jpg", jpeg(f"{k}{i}")),
                    (f"{k}{i:03d}.txt", caption.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _brace_config(tmp_path: Path, fmt: str, path: str, out: str) -> Path:
    cfg = tmp_path / f"{fmt}.yaml"
    extra = ", caption_column: TEXT, url_column: URL" if fmt == "parquet" else ""
    cfg.write_text(
        f"""input: {{format: {fmt}, path: "{path}"{extra}}}
output: {out}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - caption_complexity: {{min: 1}}
"""
    )
    return cfg


def test_brace_patterns_name_input_files_of_every_format_and_missing_ones_are_named(tmp_path, capsys):
    _tars(tmp_path / "wds", 3)
    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    import pyarrow as pa

    for k in range(3):
        pq.write_table(
            pa.table({"URL": [f"http://x/{k}.jpg"], "TEXT": [CAPTIONS[k]]}), pq_dir / f"{k:05d}.parquet"
        )
    for k in range(3):
        (tmp_path / "folders" / f"f{k}").mkdir(parents=True)
        (tmp_path / "folders" / f"f{k}" / "a.jpg").write_bytes(jpeg(str(k)))
        (tmp_path / "folders" / f"f{k}" / "a.txt").write_text(CAPTIONS[k])
    cases = {
        "webdataset": (f"{tmp_path}/wds/{{00000..00003}}.tar", 6),
        "parquet": (f"{tmp_path}/pq/{{00000..00003}}.parquet", 3),
        "image_folder": (f"{tmp_path}/folders/f{{0..3}}", 3),
    }
    for fmt, (pattern, rows) in cases.items():
        cfg = _brace_config(tmp_path, fmt, pattern, str(tmp_path / f"out-{fmt}"))
        assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err
        what = "folders" if fmt == "image_folder" else "files"
        assert f"3 of 4 {what} found (1 missing: " in capsys.readouterr().out
        assert main(["run", str(cfg)]) == 0
        assert f"3 of 4 {what} found" in capsys.readouterr().err
        assert pq.read_table(tmp_path / f"out-{fmt}" / "manifests").num_rows == rows


def test_brace_pattern_over_s3_input(tmp_path, bucket, s3, capsys):
    _tars(tmp_path / "wds", 2)
    client = s3.client()
    for p in sorted((tmp_path / "wds").glob("*.tar")):
        client.upload_file(str(p), bucket, f"in/{p.name}")
    cfg = _brace_config(
        tmp_path, "webdataset", f"s3://{bucket}/in/{{00000..00001}}.tar", str(tmp_path / "out")
    )
    assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err
    assert "webdataset input: 2 file(s)" in capsys.readouterr().out
    assert main(["run", str(cfg)]) == 0
    assert pq.read_table(tmp_path / "out" / "manifests").num_rows == 4


# ---------------------------------------------------------------------------- unexpected errors, Ctrl-C


def test_an_unexpected_error_is_one_line_and_the_traceback_needs_curate_debug(run, monkeypatch, capsys):
    from curation import query

    def broken(*args, **kwargs):
        raise RuntimeError("a bug nobody foresaw")

    monkeypatch.setattr(query, "compute_status", broken)  # stands in for any bug in any command
    assert main(["status", str(run)]) == 1
    err = capsys.readouterr().err
    assert err == (
        "curate: error: unexpected RuntimeError: a bug nobody foresaw (set CURATE_DEBUG=1 for the traceback)\n"
    )
    monkeypatch.setenv("CURATE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="nobody foresaw"):
        main(["status", str(run)])


def test_ctrl_c_of_run_is_one_line_that_says_how_to_resume(tmp_path):
    import signal
    import time

    from tests.helpers import laion_10k, started_as_from_a_terminal, write_config

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", laion_10k(), out, rows_per_shard=500)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "curation.cli", "run", str(cfg)]
    with started_as_from_a_terminal(cmd, env=env, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.time() + 120
        while not list((out / "ledger").glob("shard-*.json")):
            assert proc.poll() is None and time.time() < deadline, (
                "run finished before it could be interrupted"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "curate: interrupted: finished shards are kept; run the same command again to resume"
    )


# ---------------------------------------------------------------------------- the Ray runner's address


def test_validate_checks_the_runner_address_and_run_writes_nothing_before_joining(
    tmp_path, monkeypatch, capsys
):
    from tests.helpers import LAION_1K, write_config

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no cluster started on this machine, as far as Ray sees
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out)
    cfg.write_text(cfg.read_text().replace("runner: {type: local,", "runner: {type: ray, address: auto,"))
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "runner.address" in err and "none runs on this machine" in err and "runner.address=null" in err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    for argv in (["validate", str(cfg)], ["run", str(cfg), "--limit", "10"]):
        assert main([*argv, "--set", f"runner.address=127.0.0.1:{port}"]) == 2
        assert "cannot reach the Ray cluster" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*"))  # no run.json, no lock: nothing before the join
    assert main(["validate", str(cfg), "--set", "runner.address=null"]) == 0


# ---------------------------------------------------------------------------- feedback in logs, status


def test_into_a_log_run_prints_one_line_per_shard_and_no_progress_frames(tmp_path):
    from tests.helpers import LAION_1K, write_config

    cfg = write_config(tmp_path / "c.yaml", LAION_1K, tmp_path / "out", rows_per_shard=250)
    cfg.write_text(cfg.read_text().replace("progress: false", "progress: true"))
    proc = curate("run", str(cfg))  # stderr is a pipe, as when redirected to a log
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("curate: shard ")]
    assert [ln.split()[2] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"], proc.stderr
    assert all("rows/s" in ln for ln in lines) and "1,000 rows" in lines[-1]
    quiet = curate("run", str(cfg), "--no-progress", "-o", str(tmp_path / "q"))
    assert quiet.returncode == 0 and "curate: shard" not in quiet.stderr


def test_status_shows_rate_and_eta_of_a_run_in_progress_and_says_a_limit_run_is_a_trial(tmp_path, capsys):
    from curation.rundir import RunDir
    from tests.helpers import LAION_1K, write_config

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=100)
    assert main(["run", str(cfg), "--limit", "400"]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a `--limit 400` trial" in text and "rows/s" not in text  # not running: no rate
    with RunDir(out).lock():  # what a running `curate run` holds
        assert main(["status", str(out)]) == 0
        text = capsys.readouterr().out
    assert "(a run is in progress)" in text
    assert re.search(r"rate     [\d,.]+ rows/s, about \d+s left", text), text
    assert main(["run", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["status", str(out)]) == 0
    assert "trial" not in capsys.readouterr().out  # extended to the whole input


# ---------------------------------------------------------------------------- select writes input order


def _selected_keys(out: Path) -> list[str]:
    import json as _json

    uids = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            uids += [_json.loads(tar.extractfile(m).read())["uid"] for m in tar if m.name.endswith(".json")]
    return uids


def test_select_writes_samples_in_input_row_order_not_by_key_or_download_completion(tmp_path, image_server):
    import pyarrow as pa

    from curation.schema import make_uid

    # webdataset input whose keys do not sort in input order
    keys = ["m", "c", "x", "a"]
    tar_path = tmp_path / "in" / "00000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for k, caption in zip(keys, CAPTIONS):
            for name, payload in ((f"{k}.jpg", jpeg(k)), (f"{k}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cfg = _brace_config(tmp_path, "webdataset", str(tar_path), str(tmp_path / "wds"))
    assert main(["run", str(cfg)]) == 0
    assert main(["select", str(tmp_path / "wds"), "--out", str(tmp_path / "sel_wds")]) == 0
    manifest = pq.read_table(tmp_path / "wds" / "manifests").to_pylist()
    by_key = {r["key"]: r["uid"] for r in manifest}
    assert _selected_keys(tmp_path / "sel_wds") == [by_key[k] for k in keys]

    # downloads: the slow first image finishes last, and img2dataset writes in completion order
    paths = ["/slow/first.jpg", "/img/second.jpg", "/img/third.jpg", "/img/fourth.jpg"]
    urls = [image_server.url(p) for p in paths]
    pq.write_table(pa.table({"URL": urls, "TEXT": CAPTIONS}), tmp_path / "pairs.parquet")
    (tmp_path / "dl.yaml").write_text(
        f"""input: {{format: parquet, path: "{tmp_path / "pairs.parquet"}", url_column: URL, caption_column: TEXT}}
output: {tmp_path / "dl"}
runner: {{type: local, workers: 1, progress: false}}
stages:
  - download: {{timeout: 5, thread_count: 4, allow_private_addresses: [127.0.0.1/32]}}
"""
    )
    assert main(["run", str(tmp_path / "dl.yaml")]) == 0
    assert main(["select", str(tmp_path / "dl"), "--out", str(tmp_path / "sel_dl")]) == 0
    assert _selected_keys(tmp_path / "sel_dl") == [make_uid(u, c) for u, c in zip(urls, CAPTIONS)]


def test_an_empty_query_result_says_0_rows(run, capsys):
    assert main(["query", str(run), "SELECT uid FROM samples WHERE false"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "(0 rows)"
    assert main(["query", str(run), "SELECT count(*) AS n FROM samples"]) == 0
    assert "(0 rows)" not in capsys.readouterr().out


def test_a_stage_name_typo_is_one_problem_and_a_threshold_change_points_to_select_where(tmp_path, capsys):
    from tests.helpers import LAION_1K, write_config

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", LAION_1K, out, rows_per_shard=500)
    assert main(["run", str(cfg), "--limit", "20"]) == 0
    capsys.readouterr()
    typo = tmp_path / "typo.yaml"
    typo.write_text(cfg.read_text().replace("caption_action:", "caption_actoin:"))
    assert main(["validate", str(typo)]) == 2
    err = capsys.readouterr().err
    assert "unknown stage 'caption_actoin'" in err and "different config" not in err
    assert "1 problem(s)" in err
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(
        cfg.read_text().replace("caption_complexity: {min: 2}", "caption_complexity: {min: 3}")
    )
    assert main(["run", str(stricter), "--limit", "20"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and f'curate select {out} --where "..."' in err


def test_dedup_summary_lists_only_the_kinds_asked_for(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["dedup", str(copy), "--kinds", "exact"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "by kind: exact " in line and "phash" not in line and "semantic" not in line


def test_run_and_validate_take_set_like_train(tmp_path, capsys):
    from tests.helpers import LAION_1K, write_config

    cfg = write_config(tmp_path / "c.yaml", LAION_1K, tmp_path / "out", rows_per_shard=500)
    assert main(["validate", str(cfg), "--set", "input.rows_per_shard=0"]) == 2
    assert "input.rows_per_shard" in capsys.readouterr().err
    assert main(["run", str(cfg), "--set", "input.rows_per_shard=250", "--set", "runner.workers=1"]) == 0
    assert "4 shard(s) written" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # a usage error, refused as argparse parses
        main(["run", str(cfg), "--set", "nonsense"])
    assert exit_.value.code == 2 and "expected KEY=VALUE" in capsys.readouterr().err
