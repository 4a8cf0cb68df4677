"""A real HTTP server on 127.0.0.1 serving the cases a web crawl meets: good images,
404s, hangs, slow responses, garbage bytes, truncated JPEGs, a PNG with alpha, redirects
(also to any URL: `/goto/<percent-encoded URL>`), a body that drips one byte a second (`/drip/`),
bodies of 1.5 GB with or without Content-Length (`/huge/declared/...`, `/huge/streamed/...`), and any
bytes a test puts in `server.files`.

Paths encode the case, so a test builds URLs like `server.url("/img/cat.jpg")`
and reads back how often each path was requested (`server.hits`).

For crawling manners (tests/test_optouts.py): `host` puts a server on another loopback address
(127.0.0.2, 127.0.0.3, ...: one "site" each), `responses` answers exact paths with any status, headers
and body (robots.txt variants, tdmrep.json), `delays` holds an exact path back for some seconds,
`/busy/<n>/<retry-after>/...` answers 429 with that Retry-After to its first n requests, `/fail/...`
always answers 500; the server records when each path was requested (`arrivals`), the User-Agents it
saw (`agents`) and the most requests it had in flight at once (`max_in_flight`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def jpeg(seed: str, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small, valid JPEG whose colour depends on `seed` (distinct images, distinct hashes)."""
    h = hashlib.sha256(seed.encode()).digest()
    img = Image.new("RGB", size, (h[0], h[1], h[2]))
    img.paste((h[3], h[4], h[5]), (0, 0, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_alpha(size: tuple[int, int] = (40, 30)) -> bytes:
    img = Image.new("RGBA", size, (255, 0, 0, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming 10^10 pixels, with almost no data: must be refused unread."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height black pixels: 30000 x 30000 is 875 KB on disk and
    900 MB decoded (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = 500
    block = (b"\0" * (1 + width)) * rows  # each row: filter byte 0, then the pixels
    z = zlib.compressobj(6)
    parts = [z.compress(block) for _ in range(height // rows)]
    parts += [z.compress(b"\0" * (1 + width) * (height % rows)), z.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


class ImageServer:
    def __init__(
        self,
        slow_seconds: float = 0.3,
        hang_seconds: float = 5.0,
        drip_seconds: float = 1.0,
        huge_bytes: int = 1_500_000_000,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.hits: Counter[str] = Counter()
        # Exact paths answered with (status, headers, body), before everything else.
        self.responses: dict[str, tuple[int, dict[str, str], bytes]] = {}
        # Exact paths held back this many seconds before their answer.
        self.delays: dict[str, float] = {}
        self.arrivals: dict[str, list[float]] = {}
        self.agents: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        # Exact paths served with these bytes (image/png), before the cases below.
        self.files: dict[str, bytes] = {}
        self.slow_seconds = slow_seconds
        self.hang_seconds = hang_seconds
        # Set to answer hanging requests at once (after a test has killed its run).
        self.release = threading.Event()
        # Set when the first /hang/ request arrives.
        self.hanging = threading.Event()
        self.drip_seconds = drip_seconds
        # Set when a /drip/ response has sent its headers.
        self.dripping = threading.Event()
        # Body size of /huge/ responses, and what each has sent before the client hung up.
        self.huge_bytes = huge_bytes
        self.huge_sent: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] += 1
                    server.arrivals.setdefault(self.path, []).append(time.monotonic())
                    server.agents.add(self.headers.get("User-Agent", ""))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    # the client may give up (timeout): that is the point of some cases
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        server._answer(self)
                finally:
                    server._answered(self)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def _answered(self, h: BaseHTTPRequestHandler) -> None:
        """The request stops counting as in flight when its answer starts (so before the client can
        have read it all and sent its next one)."""
        with self._lock:
            if not getattr(h, "answered", False):
                h.answered = True  # type: ignore[attr-defined]
                self.in_flight -= 1

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        kind = path.split("/")[1]
        if path in self.delays:
            self.release.wait(self.delays[path])
        if path in self.responses:
            code, headers, body = self.responses[path]
            self._answered(h)
            h.send_response(code)
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(body)
        elif kind == "busy":
            _, _, n, retry_after, _ = path.split("/", 4)
            if self.hits[path] <= int(n):
                h.send_response(429)
                h.send_header("Retry-After", retry_after)
                h.send_header("Content-Length", "0")
                h.end_headers()
            else:
                self._send(h, 200, jpeg(path), "image/jpeg")
        elif kind == "fail":
            self._send(h, 500, b"internal error", "text/plain")
        elif path in self.files:
            self._send(h, 200, self.files[path], "image/png")
        elif kind == "goto":
            h.send_response(302)
            h.send_header("Location", urllib.parse.unquote(path.split("/", 2)[2]))
            h.send_header("Content-Length", "0")
            h.end_headers()
        elif kind == "img":
            self._send(h, 200, jpeg(path), "image/jpeg")
        elif kind == "png":
            self._send(h, 200, png_alpha(), "image/png")
        elif kind == "slow":
            time.sleep(self.slow_seconds)
            self._send(h, 200, jpeg(path), "image/jpeg")
        elif kind == "hang":
            self.hanging.set()
            self.release.wait(self.hang_seconds)
            self._send(h, 200, jpeg(path), "image/jpeg")
        elif kind == "drip":
            # Headers at once, then one byte a second: every socket read succeeds, the body never ends.
            body = jpeg(path) + b"\0" * 10_000
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            self.dripping.set()
            for i in range(len(body)):
                if self.release.wait(self.drip_seconds):
                    return
                h.wfile.write(body[i : i + 1])
                h.wfile.flush()
        elif kind == "huge":
            # A valid JPEG then zeros: `declared` sends Content-Length, `streamed` does not (ends at close).
            self.huge_sent[path] = 0
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            if path.split("/")[2] == "declared":
                h.send_header("Content-Length", str(self.huge_bytes))
            h.end_headers()
            chunk = jpeg(path) + b"\0" * (2**20)
            while self.huge_sent[path] < self.huge_bytes:
                h.wfile.write(chunk)
                self.huge_sent[path] += len(chunk)
            h.close_connection = True
        elif kind == "garbage":
            self._send(h, 200, hashlib.sha256(path.encode()).digest() * 20, "image/jpeg")
        elif kind == "truncated":
            self._send(h, 200, jpeg(path, (256, 256))[:200], "image/jpeg")
        elif kind == "redirect":
            h.send_response(302)
            h.send_header("Location", "/img/" + path.split("/", 2)[2])
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self._send(h, 404, b"not found", "text/plain")

    def _send(self, h: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        self._answered(h)
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def __enter__(self) -> ImageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
