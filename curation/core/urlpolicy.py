"""Fetching untrusted URLs: which schemes, which local folders, which addresses.

A URL list from the web is hostile input. Left to urllib, `file:///etc/passwd`
is read, `ftp://` and `data:` URLs are fetched, and `http://169.254.169.254/`
(a cloud VM's metadata service: the classic SSRF) answers. So the download
stage fetches through an opener built here, which allows:

- `http` and `https`;
- `file:` only for files whose real path (symlinks and `..` resolved) lies
  under a folder the config names (`download: {allow_local: [data/images]}`),
  and never as a redirect target;
- nothing else: every other scheme is refused before any I/O.

Addresses that are not public (private, loopback, link-local, multicast,
reserved, ...) are refused unless `allow_private_addresses` is true or names
networks that are allowed (`[10.1.0.0/16]`). The check runs where the socket
connects, on the address it connects to: a redirect to a private address, or
a DNS name that answers a public address to a first lookup and a private one
to the next (rebinding), is refused too, since there is no second lookup.

Every request is bounded, whatever the server does: `total_timeout` seconds from
the first connect to the last byte of the body (redirects included; a server
that sends its headers and then one byte a second ends there: "timed out after
Ns total"), and `max_bytes` bytes per response (a declared Content-Length over
it is refused before the body is read; without one, the bytes are counted as
they arrive). Both are enforced on the socket itself, so they hold for
whatever reads the response (img2dataset calls `read()` once, unbounded).

A refusal raises `UrlRefused`; its text starts with `tag` so that a caller that
only gets the text back (img2dataset records `str(error)`) can tell a refusal
from a network failure that a server could word the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.message
import functools
import http.client
import ipaddress
import os
import socket
import ssl
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import urllib.response
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

FETCHED_SCHEMES = ("http", "https")
Resolver = Callable[..., Any]  # socket.getaddrinfo's signature


class Gate(Protocol):
    """What the opener asks of a crawl gate (curation.core.crawl.HostGate)."""

    manners: Any

    def resolve(self, host: str, port: int, family: int = 0, kind: int = 0, *args: Any) -> Any: ...
    def admit(self, req: urllib.request.Request, optout_fetch: bool) -> None: ...
    def on_response(self, req: urllib.request.Request, response: Any, optout_fetch: bool) -> Any: ...
    def on_error(self, error: BaseException) -> None: ...
    def should_retry(self, error: urllib.error.HTTPError, attempt: int) -> bool: ...


class UrlRefused(Exception):
    """The URL (or the address it resolves to) may not be fetched; nothing was read."""

    def __init__(self, reason: str, tag: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.tag = tag

    def __str__(self) -> str:
        return f"{self.tag}{self.reason}"


@dataclass(frozen=True)
class UrlPolicy:
    # Real paths of the folders `file:` URLs may read (resolve them with `local_folders`).
    allow_local: tuple[str, ...] = ()
    # False: public addresses only; True: any; a tuple of networks: public ones plus these.
    allow_private: bool | tuple[str, ...] = False
    # Prefix of every refusal's text (see the module docstring).
    tag: str = ""
    # Seconds from connect to the end of the body, redirects included; None: no bound.
    total_timeout: float | None = None
    # Bytes per response (headers included when counted as they arrive); None: no bound.
    max_bytes: int | None = None

    # ------------------------------------------------------------------ URLs
    def check_url(self, url: str, *, redirect: bool = False) -> None:
        """Raise UrlRefused unless `url`'s scheme may be fetched (a redirect may only go to http/https)."""
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in FETCHED_SCHEMES:
            return
        if scheme == "file" and not redirect:
            self.local_path(url)
            return
        if redirect:
            raise self.refusal(f"redirect to a {scheme}: URL (redirects go to http and https only)")
        named = f"scheme {scheme!r}" if scheme else "a URL without a scheme"
        raise self.refusal(f"{named} is not fetched (http, https, and file: under download.allow_local are)")

    def local_path(self, url: str) -> str:
        """The real path a `file:` URL names, if it lies under an allowed folder; else UrlRefused."""
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise self.refusal(f"file: URL on another host ({parts.netloc})")
        if not self.allow_local:
            raise self.refusal("file: URLs are not read unless download.allow_local names their folder")
        path = urllib.parse.unquote(parts.path)
        try:
            real = os.path.realpath(path)
        except ValueError as e:  # an embedded NUL
            raise self.refusal(f"file: path is not a path ({e})") from None
        if not any(
            real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.allow_local
        ):
            raise self.refusal(f"file: path {real} is outside download.allow_local")
        return real

    # ------------------------------------------------------------------ addresses
    def address_refusal(self, ip: str) -> str | None:
        """Why a connection to `ip` is refused, or None."""
        if self.allow_private is True:
            return None
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(ip.split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        kind = next(
            (
                label
                for attr, label in (
                    ("is_loopback", "loopback"),
                    ("is_link_local", "link-local"),
                    ("is_multicast", "multicast"),
                    ("is_unspecified", "unspecified"),
                    ("is_private", "private"),
                    ("is_reserved", "reserved"),
                )
                if getattr(addr, attr)
            ),
            None if addr.is_global else "non-public",
        )
        if kind is None:
            return None
        if isinstance(self.allow_private, tuple) and any(
            addr in ipaddress.ip_network(net, strict=False) for net in self.allow_private
        ):
            return None
        return f"{ip} is a {kind} address"

    def check_address(self, host: str, port: int, resolve: Resolver = socket.getaddrinfo) -> None:
        """Raise UrlRefused when every address `host` resolves to is refused (as connecting would);
        a lookup that fails is left for the connection to report."""
        if self.allow_private is True:
            return
        try:
            answers = resolve(host, port, 0, socket.SOCK_STREAM)
        except OSError:
            return
        refused = [why for *_, sockaddr in answers if (why := self.address_refusal(sockaddr[0]))]
        if refused and len(refused) == len(answers):
            raise self._address_refusal(host, refused)

    def _address_refusal(self, host: str, refused: list[str]) -> UrlRefused:
        why = refused[0] if refused[0].startswith(f"{host} ") else f"{host}: {refused[0]}"
        return self.refusal(f"{why} (download.allow_private_addresses allows such addresses)")

    def create_connection(
        self,
        address: tuple[str, int],
        timeout: Any = None,
        source_address: Any = None,
        *,
        resolve: Resolver = socket.getaddrinfo,
    ) -> socket.socket:
        """`socket.create_connection`, connecting only to addresses the policy allows (looked up with
        `resolve`: a crawl gate's DNS cache, or `socket.getaddrinfo`)."""
        host, port = address
        limits = _Limits(self, getattr(_request, "deadline", None), timeout)
        last_error: OSError | None = None
        refused: list[str] = []
        for family, kind, proto, _, sockaddr in resolve(host, port, 0, socket.SOCK_STREAM):
            why = self.address_refusal(sockaddr[0])
            if why:
                refused.append(why)
                continue
            sock = _BoundedSocket(family, kind, proto)
            try:
                sock.settimeout(limits.timeout())
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                sock.limits = limits  # reads are bounded from here on (HTTPS: on the wrapped socket)
                return sock
            except OSError as e:
                last_error = limits.explain(e)
                sock.close()
        if last_error is not None:
            raise last_error
        if refused:
            raise self._address_refusal(host, refused)
        raise OSError(f"getaddrinfo returned no address for {host}")

    # ------------------------------------------------------------------ urllib
    def opener(self, gate: Gate | None = None) -> urllib.request.OpenerDirector:
        """An opener that fetches http(s) and allowed local files, and refuses everything else; with a
        `gate` (curation.core.crawl.HostGate), every http(s) request passes it first."""
        opener = _Opener(self.total_timeout, gate)
        resolve = socket.getaddrinfo if gate is None else gate.resolve
        gated = () if gate is None else (_GateHandler(self, gate),)
        for handler in (
            *gated,
            _SchemeCheck(self),
            _SizeCheck(self),
            _HTTPHandler(self, resolve),
            _HTTPSHandler(self, resolve),
            _RedirectHandler(self),
            _LocalFileHandler(self),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
            urllib.request.UnknownHandler(),
        ):
            opener.add_handler(handler)
        return opener

    @contextlib.contextmanager
    def installed(self, gate: Gate | None = None) -> Iterator[None]:
        """Make `urllib.request.urlopen` (what img2dataset calls) use this policy's opener, in this process."""
        previous = urllib.request._opener  # the module's own global (None until someone installs one)
        urllib.request.install_opener(self.opener(gate))
        try:
            yield
        finally:
            urllib.request.install_opener(previous)  # type: ignore[arg-type]

    def refusal(self, reason: str) -> UrlRefused:
        return UrlRefused(f"refused: {reason}", self.tag)

    def fetch_head(
        self, url: str, *, limit: int, timeout: float, gate: Gate | None, user_agent: str
    ) -> tuple[int, bytes]:
        """(HTTP status, the body's first `limit` bytes) of a small file a crawl needs (robots.txt), under
        this policy on a clock of its own; an error status has no body. Raises what `urlopen` raises."""
        saved = (getattr(_request, "depth", 0), getattr(_request, "deadline", None))
        _request.depth = 0
        req = urllib.request.Request(url, headers={"User-Agent": user_agent})
        req.optout_fetch = True  # type: ignore[attr-defined]  # the gate checks no opt-out for it
        # Only `limit` bytes are read and the rest never arrives: max_bytes is for images.
        opener = dataclasses.replace(self, max_bytes=None).opener(gate)
        try:
            with opener.open(req, timeout=timeout) as response:
                return response.status, response.read(limit)
        except urllib.error.HTTPError as e:
            e.close()
            return e.code, b""
        finally:
            _request.depth, _request.deadline = saved


def local_folders(folders: list[str] | None) -> tuple[str, ...]:
    """Real paths of the folders `file:` URLs may read (relative to the working directory)."""
    return tuple(os.path.realpath(f) for f in folders or ())


def parse_networks(value: bool | list[str] | None) -> bool | tuple[str, ...]:
    """`allow_private_addresses` as the policy takes it; raises ValueError naming a bad network."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    for net in value:
        ipaddress.ip_network(net, strict=False)
    return tuple(value)


# ---------------------------------------------------------------------------- handlers


class _SchemeCheck(urllib.request.BaseHandler):
    """Runs before every open, redirects included (the opener calls `default_open` first)."""

    handler_order = 100

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def default_open(self, req: urllib.request.Request) -> None:
        self.policy.check_url(req.full_url)
        return None  # go on to the scheme's handler


def _connection_factory(policy: UrlPolicy, cls: type[http.client.HTTPConnection], resolve: Resolver):
    connect = functools.partial(policy.create_connection, resolve=resolve)

    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = cls(host, **kwargs)
        # http.client connects through this attribute (HTTPS wraps the socket afterwards, with SNI).
        conn._create_connection = connect  # type: ignore[attr-defined]
        return conn

    return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: UrlPolicy, resolve: Resolver) -> None:
        super().__init__()
        self._make = _connection_factory(policy, http.client.HTTPConnection, resolve)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._make, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: UrlPolicy, resolve: Resolver) -> None:
        super().__init__(context=_https_context())
        self._make = _connection_factory(policy, http.client.HTTPSConnection, resolve)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._make, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """A redirect goes only to http(s); the address it names is checked when its connection is made."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def http_error_302(self, req, fp, code, msg, headers):  # type: ignore[no-untyped-def]
        location = headers.get("location") or headers.get("uri")
        if location:
            try:
                self.policy.check_url(urllib.parse.urljoin(req.full_url, location), redirect=True)
            except UrlRefused:
                fp.close()  # ends the response's host slot now, not when it is collected
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and getattr(req, "optout_fetch", False):
            new.optout_fetch = True  # a redirected robots.txt is still a robots.txt fetch
        return new

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _LocalFileHandler(urllib.request.BaseHandler):
    """`file:` URLs under the allowed folders: regular files only (no FIFO, no device), opened at their
    real path without following a symlink swapped in since."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def file_open(self, req: urllib.request.Request) -> urllib.response.addinfourl:
        path = self.policy.local_path(req.full_url)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise urllib.error.URLError(e) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise self.policy.refusal(f"file: path {path} is not a regular file")
        headers = email.message.Message()
        headers["Content-Length"] = str(info.st_size)
        return urllib.response.addinfourl(os.fdopen(fd, "rb"), headers, req.full_url)


# ---------------------------------------------------------------------------- bounds

# The deadline of the request this thread is making (img2dataset fetches from a thread pool).
_request = threading.local()


class _Opener(urllib.request.OpenerDirector):
    """Starts each request's clock; a redirect (a nested `open`) runs on the clock of its request. With a
    gate, a failed request is reported to it, and a 429/503 retried when the gate says so."""

    def __init__(self, total_timeout: float | None, gate: Gate | None = None) -> None:
        super().__init__()
        self.total_timeout = total_timeout
        self.gate = gate

    def open(self, fullurl: Any, data: Any = None, timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT) -> Any:  # type: ignore[attr-defined]
        if self.gate is None or getattr(_request, "depth", 0) or getattr(fullurl, "optout_fetch", False):
            # robots.txt answering 5xx is a verdict (not allowed), not something to wait out
            return self._attempt(fullurl, data, timeout)
        attempt = 0
        while True:
            try:
                return self._attempt(fullurl, data, timeout)
            except urllib.error.HTTPError as e:
                if not self.gate.should_retry(e, attempt):
                    raise
                e.close()
                attempt += 1

    def _attempt(self, fullurl: Any, data: Any, timeout: Any) -> Any:
        depth = getattr(_request, "depth", 0)
        if depth == 0:
            _request.deadline = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        _request.depth = depth + 1
        try:
            return super().open(fullurl, data, timeout)
        except BaseException as e:
            if self.gate is not None and not isinstance(e, urllib.error.HTTPError):
                self.gate.on_error(e)
            raise
        finally:
            _request.depth = depth


class _GateHandler(urllib.request.BaseHandler):
    """Every http(s) request (redirects included) waits for the gate's leave; every response is shown to
    it before its body is read. Sets the User-Agent the crawl announces."""

    handler_order = 400  # responses: before the size check

    def __init__(self, policy: UrlPolicy, gate: Gate) -> None:
        self.policy = policy
        self.gate = gate

    def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
        self.gate.admit(req, getattr(req, "optout_fetch", False))
        req.headers["User-agent"] = self.gate.manners.user_agent
        if getattr(_request, "depth", 0) == 1 and self.policy.total_timeout is not None:
            # Waiting for the host's turn is not the request's time: its clock starts now.
            _request.deadline = time.monotonic() + self.policy.total_timeout
        return req

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        return self.gate.on_response(req, response, getattr(req, "optout_fetch", False))

    https_request = http_request
    https_response = http_response


class _Limits:
    """One connection's bounds: its request's deadline, the per-read timeout, the bytes it may receive."""

    def __init__(self, policy: UrlPolicy, deadline: float | None, read_timeout: Any) -> None:
        self.policy = policy
        self.deadline = deadline
        self.read_timeout = read_timeout if isinstance(read_timeout, (int, float)) else None
        self.received = 0

    def timeout(self) -> float | None:
        """The timeout of the next socket operation; TimeoutError once the deadline has passed."""
        if self.deadline is None:
            return self.read_timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left if self.read_timeout is None else min(left, self.read_timeout)

    def expired(self) -> TimeoutError:
        return TimeoutError(f"timed out after {self.policy.total_timeout:g}s total")

    def explain(self, error: OSError) -> OSError:
        """A socket timeout caused by the deadline says so."""
        if (
            isinstance(error, TimeoutError)
            and self.deadline is not None
            and time.monotonic() >= self.deadline
        ):
            return self.expired()
        return error

    def count(self, n: int) -> None:
        self.received += n
        limit = self.policy.max_bytes
        if limit is not None and self.received > limit:
            raise UrlRefused(
                f"too_large: response over download.max_bytes ({limit:,} bytes)", self.policy.tag
            )


class _BoundedReads:
    """Socket reads under the connection's `_Limits` (a mixin for the plain and the TLS socket)."""

    limits: _Limits | None = None

    def recv_into(self, buffer: Any, *args: Any, **kwargs: Any) -> int:
        if self.limits is None:
            return super().recv_into(buffer, *args, **kwargs)  # type: ignore[misc]
        self.settimeout(self.limits.timeout())  # type: ignore[attr-defined]
        try:
            n = super().recv_into(buffer, *args, **kwargs)  # type: ignore[misc]
        except OSError as e:
            raise self.limits.explain(e) from None
        self.limits.count(n)
        return n

    def recv(self, *args: Any, **kwargs: Any) -> bytes:
        if self.limits is None:
            return super().recv(*args, **kwargs)  # type: ignore[misc]
        self.settimeout(self.limits.timeout())  # type: ignore[attr-defined]
        try:
            data = super().recv(*args, **kwargs)  # type: ignore[misc]
        except OSError as e:
            raise self.limits.explain(e) from None
        self.limits.count(len(data))
        return data


class _BoundedSocket(_BoundedReads, socket.socket):
    pass


class _BoundedSSLSocket(_BoundedReads, ssl.SSLSocket):
    @classmethod
    def _create(cls, sock: socket.socket, *args: Any, **kwargs: Any) -> _BoundedSSLSocket:  # type: ignore[override]
        limits = getattr(sock, "limits", None)
        wrapped = super()._create(sock, *args, **kwargs)  # type: ignore[misc]
        wrapped.limits = limits
        return wrapped


def _https_context() -> ssl.SSLContext:
    """http.client's default context (verified certificates, HTTP/1.1), with bounded reads."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    context.sslsocket_class = _BoundedSSLSocket
    return context


class _SizeCheck(urllib.request.BaseHandler):
    """Refuses a response whose declared Content-Length is over `max_bytes`, before its body is read."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def http_response(self, req: urllib.request.Request, response: Any) -> Any:
        limit = self.policy.max_bytes
        declared = (response.headers.get("Content-Length") or "").strip()
        if limit is not None and declared.isdigit() and int(declared) > limit:
            response.close()
            raise UrlRefused(
                f"too_large: response declares {int(declared):,} bytes > download.max_bytes ({limit:,})",
                self.policy.tag,
            )
        return response

    https_response = file_response = http_response
