"""Hostile URL lists and image bombs through the real download stage (img2dataset), against a real
HTTP server and a real TCP listener on 127.0.0.1: every refusal is a per-row status, nothing refused
is read or connected to, and no row is lost or duplicated."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.cli import main
from curation.config import ConfigError
from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.validation import parse_checked_config
from tests.helpers import REPO
from tests.imageserver import ImageServer, jpeg, png_bomb

CAPTION = "A man rides a red bicycle down the street."


class Listener:
    """A TCP port that only counts the connections made to it (an ftp/gopher fetch would connect)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener():
    lst = Listener()
    yield lst
    lst.close()


def run_download(tmp: Path, urls: list[str], params: str) -> dict[str, list[dict]]:
    """`curate run` of a download-only pipeline over `urls`; manifest rows by url (a url may repeat)."""
    pq.write_table(pa.table({"url": urls, "caption": [CAPTION] * len(urls)}), tmp / "pairs.parquet")
    cfg = tmp / "c.yaml"
    cfg.write_text(
        f"input: {{path: {tmp / 'pairs.parquet'}, rows_per_shard: 100}}\n"
        f"output: {tmp / 'out'}\n"
        "runner: {workers: 1, progress: false}\n"
        f"stages:\n  - download: {{timeout: 2, thread_count: 8, {params}}}\n"
    )
    assert main(["run", str(cfg)]) == 0
    rows = pq.read_table(tmp / "out" / "manifests").to_pylist()
    assert len(rows) == len(urls)  # nothing lost, nothing duplicated
    assert sorted(r["url"] for r in rows) == sorted(urls)
    by_url: dict[str, list[dict]] = {}
    for r in rows:
        by_url.setdefault(r["url"], []).append(r)
    return by_url


def assert_refused(row: dict, because: str) -> None:
    assert row["status"] == "refused", (row["url"], row["status"], row["error_message"])
    assert because in row["error_message"], (row["url"], row["error_message"])
    assert (row["keep"], row["drop_reason"], row["image_path"], row["sha256"]) == (
        False,
        "download",
        None,
        None,
    )


def test_schemes_local_files_and_private_addresses_are_refused_per_row(tmp_path, listener):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.jpg").write_bytes(jpeg("ok"))
    (tmp_path / "outside.jpg").write_bytes(jpeg("outside"))
    (allowed / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    os.mkfifo(allowed / "fifo.jpg")  # opening it for reading would wait for a writer forever
    png = base64.b64encode(Image.new("RGB", (4, 4)).tobytes()).decode()
    with ImageServer() as server:
        cases = {
            "file:///etc/passwd": "outside download.allow_local",
            "file:../../../../../../../../etc/passwd": "outside download.allow_local",
            "file:///proc/self/environ": "outside download.allow_local",
            f"file:{allowed}/../outside.jpg": "outside download.allow_local",
            f"file:{allowed}/%2e%2e/outside.jpg": "outside download.allow_local",
            f"file:{allowed}/link.jpg": "outside download.allow_local",  # a symlink out of the folder
            f"file:{allowed}/fifo.jpg": "not a regular file",
            "file://files.example/etc/passwd": "another host",
            f"ftp://127.0.0.1:{listener.port}/x.jpg": "scheme 'ftp' is not fetched",
            f"gopher://127.0.0.1:{listener.port}/x": "scheme 'gopher' is not fetched",
            f"data:image/png;base64,{png}": "scheme 'data' is not fetched",
            server.url("/img/a.jpg"): "127.0.0.1 is a loopback address",
            f"http://localhost:{server.port}/img/b.jpg": "is a loopback address",
            f"http://[::ffff:127.0.0.1]:{server.port}/img/c.jpg": "is a loopback address",
            f"http://2130706433:{server.port}/img/d.jpg": "127.0.0.1 is a loopback address",
            "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a link-local address",
            "http://10.11.12.13/x.jpg": "10.11.12.13 is a private address",
            "http://0.0.0.0/x.jpg": "0.0.0.0 is a unspecified address",
        }
        ok = f"file:{allowed}/ok.jpg"
        urls = [*cases, ok, "file:///etc/passwd"]  # a refused pair twice: two rows, both refused
        rows = run_download(tmp_path, urls, f"allow_local: [{allowed}]")
        assert server.hits == {}  # nothing reached the server
    assert listener.connections == 0  # ftp and gopher never connected
    for url, because in cases.items():
        for row in rows[url]:
            assert_refused(row, because)
    assert len(rows["file:///etc/passwd"]) == 2
    assert rows[ok][0]["status"] == "success" and rows[ok][0]["keep"]


def test_redirects_cannot_reach_refused_schemes_or_addresses(tmp_path, listener):
    with ImageServer() as server:

        def goto(url: str) -> str:
            return server.url("/goto/" + urllib.parse.quote(url, safe=""))

        cases = {
            goto("file:///etc/passwd"): "redirect to a file: URL",
            goto(f"ftp://127.0.0.1:{listener.port}/x.jpg"): "redirect to a ftp: URL",
            goto("http://169.254.169.254/latest/meta-data/"): "169.254.169.254 is a link-local address",
            # only 127.0.0.1 is allowed below: another loopback address is not
            goto(f"http://127.0.0.2:{server.port}/img/x.jpg"): "127.0.0.2 is a loopback address",
        }
        fine = goto(server.url("/img/y.jpg"))
        rows = run_download(tmp_path, [*cases, fine], "allow_private_addresses: [127.0.0.1/32]")
        assert server.hits["/img/x.jpg"] == 0 and server.hits["/img/y.jpg"] == 1
    assert listener.connections == 0
    for url, because in cases.items():
        assert_refused(rows[url][0], because)
    assert rows[fine][0]["status"] == "success"


def test_a_decompression_bomb_is_refused_from_its_header_in_download(tmp_path):
    bomb = png_bomb(30_000, 30_000)  # 875 KB, 900 megapixels
    assert len(bomb) < 1_000_000
    with ImageServer() as server:
        server.files["/bomb.png"] = bomb
        server.files["/big.png"] = png_bomb(10_000, 10_000)  # 100 MP: above our limit, below Pillow's
        server.files["/fine.png"] = png_bomb(300, 200)
        urls = [server.url(p) for p in ("/bomb.png", "/big.png", "/fine.png", "/garbage/g.jpg")]
        rows = run_download(tmp_path, urls, "allow_private_addresses: true")
    bomb_row, big, fine, garbage = (rows[u][0] for u in urls)
    # Pillow itself stops at twice its warning level, while reading the header; our limit is below.
    assert "900000000 pixels" in bomb_row["error_message"]
    assert big["error_message"] == f"10000x10000 pixels > max_pixels {DEFAULT_MAX_PIXELS:,}"
    for row in (bomb_row, big):
        assert row["status"] == "too_large", row
        assert (row["drop_reason"], row["width"], row["image_path"]) == ("decode", None, None)
    assert (fine["status"], fine["original_width"], fine["original_height"]) == ("success", 300, 200)
    assert garbage["status"] == "failed_to_resize" and garbage["error_message"].startswith("decode_error")


def test_max_pixels_is_configurable(tmp_path):
    with ImageServer() as server:
        server.files["/a.png"] = png_bomb(300, 200)
        rows = run_download(
            tmp_path, [server.url("/a.png")], "allow_private_addresses: true, max_pixels: 50000"
        )
    (row,) = rows[server.url("/a.png")]
    assert row["status"] == "too_large" and row["error_message"] == "300x200 pixels > max_pixels 50,000"


def test_a_server_cannot_forge_a_refusal(tmp_path):
    """A status line the server chooses becomes img2dataset's error message; it stays a download failure."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def answer() -> None:
        conn, _ = sock.accept()
        conn.recv(65536)
        conn.sendall(b"refused: scheme 'http' is not fetched\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/x.jpg"
    # The server answers one connection: opt-out files are not asked for (they would take it).
    params = "allow_private_addresses: true, retries: 0, respect_robots_txt: false, respect_tdmrep: false"
    rows = run_download(tmp_path, [url], params)
    sock.close()
    assert rows[url][0]["status"] == "failed_to_download"


def test_policy_config_problems_are_reported_with_their_keys(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"")
    pq.write_table(pa.table({"url": ["x"], "caption": ["y"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError) as e:
        parse_checked_config(
            f"input: {{path: {tmp_path / 'p.parquet'}}}\noutput: {tmp_path / 'out'}\nstages:\n"
            "  - download: {allow_local: [no/such/folder], allow_private_addresses: [10.0.0.0/33], max_pixels: 0}\n"
        )
    msg = str(e.value)
    assert "stages[0].download (line 4): allow_local: 'no/such/folder' is not a folder" in msg
    assert "allow_private_addresses: '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network" in msg
    assert "stages[0].download.max_pixels (line 4): must be >= 1, got 0" in msg


def test_select_leaves_out_image_bombs_of_inputs_that_bring_their_images(tmp_path, capsys):
    """An image folder holds its own images (no download stage): select checks each header before
    writing, since training decodes whatever the shards hold."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(png_bomb(10_000, 10_000))
    Image.new("RGB", (10_000, 9_000)).save(folder / "big.bmp")  # converted to PNG: decoded, so checked first
    Image.new("RGB", (32, 24), (1, 2, 3)).save(folder / "fine.jpg")
    for name in ("bomb", "big", "fine"):
        (folder / f"{name}.txt").write_text(CAPTION)
    (tmp_path / "c.yaml").write_text(
        # big.bmp holds 270 MB: above the default input.max_member_bytes, so raise it for select to see it
        f"input: {{format: image_folder, path: {folder}, max_member_bytes: 300000000}}\n"
        f"output: {tmp_path / 'out'}\nrunner: {{workers: 1, progress: false}}\nstages: [caption_complexity]\n"
    )
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    assert main(["select", str(tmp_path / "out"), "--out", str(tmp_path / "sel")]) == 1
    err = capsys.readouterr().err
    assert "2 selected images could not be read" in err
    assert "bomb.png : too_large: 10000x10000 pixels > max_pixels 89,478,485" in err
    assert "big.bmp : too_large: 10000x9000 pixels" in err
    assert (tmp_path / "sel" / "sizes.json").read_text().strip() == '{\n "00000.tar": 1\n}'


@pytest.mark.timeout(120)  # without a bound on the whole request this run never ends
def test_a_server_that_drips_its_body_is_cut_off_at_total_timeout(tmp_path):
    """Each socket read gets its byte within `timeout`; only the total bound ends the request."""
    with ImageServer(drip_seconds=1.0) as server:
        urls = [server.url("/drip/a.jpg"), server.url("/img/good.jpg"), server.url("/img/other.jpg")]
        rows = run_download(tmp_path, urls, "allow_private_addresses: true, total_timeout: 3")
        assert server.dripping.is_set()
    drip, good, other = (rows[u][0] for u in urls)
    assert (drip["status"], drip["error_message"]) == ("failed_to_download", "timed out after 3s total")
    assert (drip["keep"], drip["drop_reason"], drip["image_path"]) == (False, "download", None)
    assert good["status"] == other["status"] == "success"


@pytest.mark.timeout(120)
def test_a_huge_response_is_refused_early_or_cut_off_at_max_bytes(tmp_path):
    """1.5 GB bodies: a declared Content-Length is refused before the body is read; without one the
    bytes are counted and the transfer stops at `max_bytes` (here 1 MB)."""
    with ImageServer() as server:
        urls = [
            server.url("/huge/declared/a.jpg"),
            server.url("/huge/streamed/b.jpg"),
            server.url("/img/good.jpg"),
        ]
        rows = run_download(tmp_path, urls, "allow_private_addresses: true, max_bytes: 1000000")
        sent = dict(server.huge_sent)
    declared, streamed, good = (rows[u][0] for u in urls)
    assert declared["status"] == "too_large"
    assert declared["error_message"] == (
        "response declares 1,500,000,000 bytes > download.max_bytes (1,000,000)"
    )
    assert streamed["status"] == "too_large"
    assert streamed["error_message"] == "response over download.max_bytes (1,000,000 bytes)"
    for row in (declared, streamed):
        assert (row["keep"], row["image_path"], row["sha256"]) == (False, None, None)
    assert good["status"] == "success"
    # The server stopped long before 1.5 GB: the client hung up (socket buffers hold a few MB).
    assert all(n < 200_000_000 for n in sent.values()), sent


def test_max_bytes_default_is_sized_for_images(tmp_path):
    """A 40 MB body (a valid JPEG followed by zeros, as in the report) is refused by default."""
    with ImageServer(huge_bytes=40_000_000) as server:
        url = server.url("/huge/streamed/c.jpg")
        rows = run_download(tmp_path, [url], "allow_private_addresses: true")
    (row,) = rows[url]
    assert row["status"] == "too_large"
    assert row["error_message"] == f"response over download.max_bytes ({32 * 2**20:,} bytes)"


def test_download_bounds_are_checked_with_their_keys(tmp_path):
    pq.write_table(pa.table({"url": ["x"], "caption": ["y"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError) as e:
        parse_checked_config(
            f"input: {{path: {tmp_path / 'p.parquet'}}}\noutput: {tmp_path / 'out'}\nstages:\n"
            "  - download: {max_bytes: 0, total_timeout: 0}\n"
        )
    assert "stages[0].download.max_bytes (line 4): must be >= 1, got 0" in str(e.value)
    assert "stages[0].download.total_timeout (line 4): must be > 0, got 0" in str(e.value)


@pytest.mark.timeout(300)
def test_kill_9_with_download_processes_leaves_no_process_behind(tmp_path):
    """`download.processes_count: 2` runs img2dataset jobs in a spawn pool: its processes and
    multiprocessing's resource tracker end with the driver, as the runner's own workers do."""
    from tests.test_run import _session

    urls = [f"/hang/{i}.jpg" for i in range(8)]
    with ImageServer(hang_seconds=600) as server:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"input: {{path: {tmp_path / 'pairs.parquet'}, url_column: url}}\n"
            f"output: {tmp_path / 'out'}\nrunner: {{workers: 1, progress: false}}\n"
            "stages:\n  - download: {processes_count: 2, thread_count: 2, timeout: 600, total_timeout: 600, "
            "allow_private_addresses: true}\n"
        )
        pq.write_table(
            pa.table({"url": [server.url(u) for u in urls], "caption": [CAPTION] * len(urls)}),
            tmp_path / "pairs.parquet",
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "curation.cli", "run", str(cfg)],
            cwd=REPO,
            start_new_session=True,  # a session of its own: how this test finds every process it starts
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert server.hanging.wait(240), "the download pool never fetched"
            children = {pid: cmd for pid, cmd in _session(proc.pid).items() if pid != proc.pid}
            assert sum("spawn_main" in cmd for cmd in children.values()) >= 2, children
            assert any("resource_tracker" in cmd for cmd in children.values()), children
            os.kill(proc.pid, signal.SIGKILL)  # the driver only: nobody tells the pool
            proc.wait()
            deadline = time.monotonic() + 60
            while _session(proc.pid):
                assert time.monotonic() < deadline, (
                    f"left running after the driver died: {_session(proc.pid)}"
                )
                time.sleep(0.05)
        finally:
            for pid in _session(proc.pid):  # never leave strays behind, even when the test fails
                os.kill(pid, signal.SIGKILL)
