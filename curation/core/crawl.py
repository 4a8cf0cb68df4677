"""Crawling manners: opt-outs checked before an image is fetched, and per-host politeness.

The download stage fetches through `curation.core.urlpolicy`'s opener; a `HostGate` given to that
opener sees every http(s) request (redirects included) before it leaves and every response before
its body is read. One gate serves all the download threads of one worker and keeps, for that worker:

Opt-outs (a refused row's status names the rule; nothing of the image is requested):
- `robots`: the host's robots.txt (RFC 9309, parsed by Protego, Scrapy's parser), fetched once per
  origin and cached for a day, through the same URL policy and timeouts as images and with the same
  User-Agent. The rules of the group for `token` (else `*`) decide. Missing or any other 4xx: all
  allowed. 5xx or 429: not fetched, so not allowed (`unreachable: refuse`, Google's rule; `allow`
  takes the other side). No answer at all (no such host, connection refused, timed out) is no
  statement by the site: under `refuse` the host's rows fail as downloads (`failed_to_download`,
  "robots.txt not fetched"), none of them requested. A redirect is followed (up to 10, more than
  RFC 9309's 5); only the first 500 KiB is parsed (Google's limit). Crawl-delay is honoured up to
  `max_crawl_delay` seconds.
- `tdm_reservation`: TDMRep (W3C). `/.well-known/tdmrep.json` of the origin (fetched and cached like
  robots.txt: a list of {location, tdm-reservation, tdm-policy}, the first rule whose location pattern
  matches the path decides), and the `tdm-reservation: 1` response header of the image itself.
- `x_robots_tag`: an `X-Robots-Tag` response header with one of `x_robots_directives`, for all
  agents or for `token` (as img2dataset checks it, here before the body is read).

Politeness, per host name (the limits hold per worker: a cluster sends workers x limit):
- at most `max_concurrent` requests in flight (from the first byte sent to the response's close) and
  at most `max_rate` request starts a second (or one per Crawl-delay when that is longer);
- a 429 or 503 pauses the host for its Retry-After (seconds or an HTTP date; exponential from 1 s
  without one), at most `max_retry_after` seconds; the request is then retried, `backoff_retries`
  times at most (a longer Retry-After is not waited for: the row fails with the HTTP error);
- `max_failures` consecutive failures of a host (no connection, timeout, 5xx, 429) give it up for
  the rest of the shard: its remaining rows get status `host_given_up` at once;
- DNS answers are cached (`DNS_TTL` seconds, failures for `DNS_FAILURE_TTL`).

A refusal is a `UrlRefused` whose text starts with the stage's tag and the status
(`<tag>robots: ...`), which the download stage turns into the row's status.
"""

from __future__ import annotations

import email.utils
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from curation.core.urlpolicy import UrlPolicy, UrlRefused

# The statuses a refused row gets (the download stage's drop reason for them is `opt_out`).
OPT_OUT_STATUSES = ("robots", "tdm_reservation", "x_robots_tag")
GIVEN_UP_STATUS = "host_given_up"
# Google parses the first 500 KiB of a robots.txt; the same bound serves tdmrep.json.
OPT_OUT_MAX_BYTES = 500 * 1024
# RFC 9309: a cached robots.txt should not be used for more than 24 hours.
OPT_OUT_TTL = 24 * 3600.0
DNS_TTL = 300.0
DNS_FAILURE_TTL = 60.0
# Origins and host names remembered per worker; the oldest go first beyond this.
MAX_REMEMBERED = 100_000
BACKOFF_CODES = (429, 503)
TOKEN_RE = re.compile(r"[A-Za-z_-]+")  # RFC 9309's product token


@dataclass(frozen=True)
class Manners:
    """What a gate enforces (the download stage's params, see docs/optouts.md)."""

    user_agent: str
    token: str
    robots: bool = True
    tdmrep: bool = True
    x_robots_directives: frozenset[str] = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
    unreachable: Literal["refuse", "allow"] = "refuse"
    timeout: float = 10.0
    max_concurrent: int | None = 4
    max_rate: float | None = 5.0
    max_crawl_delay: float = 10.0
    max_retry_after: float = 60.0
    backoff_retries: int = 2
    max_failures: int | None = 10


def user_agent(token: str, version: str, contact_url: str | None) -> str:
    """The User-Agent every request sends: identifiable (token, version) and, when set, how to reach us."""
    contact = f"; +{contact_url}" if contact_url else ""
    return f"Mozilla/5.0 (compatible; {token}/{version}{contact})"


# ---------------------------------------------------------------------------- opt-out rules


@dataclass(frozen=True)
class _Rules:
    """An origin's robots.txt or tdmrep.json as fetched: parsed rules, or a verdict for every path."""

    url: str
    expires: float
    parsed: Any = None  # Protego for robots.txt, a list of (compiled location, reserved) for tdmrep.json
    refusal: str | None = None  # set: every path is refused, for this reason
    unanswered: str | None = None  # set: the host sent no answer at all, so every path fails, for this reason


def _unanswered(url: str, status: int | None, why: str, unreachable: str) -> _Rules | None:
    """No HTTP answer at all (no such host, connection refused, timed out): not an opt-out a site
    stated, so the host's rows fail as downloads (none of them requested) rather than as refusals."""
    if status is None and unreachable == "refuse":
        return _Rules(url, time.monotonic() + OPT_OUT_TTL, unanswered=f"{url} not fetched ({why})")
    return None


def _robots_rules(url: str, status: int | None, body: bytes, why: str, unreachable: str) -> _Rules:
    expires = time.monotonic() + OPT_OUT_TTL
    if (failed := _unanswered(url, status, why, unreachable)) is not None:
        return failed
    if status is not None and 200 <= status < 300:
        from protego import Protego

        try:
            return _Rules(url, expires, parsed=Protego.parse(body.decode("utf-8", "replace")))
        except Exception:  # a parser error on hostile text: as malformed lines, no rule
            return _Rules(url, expires)
    if status is not None and 300 <= status < 500 and status != 429:  # unavailable: no restriction
        return _Rules(url, expires)
    if unreachable == "allow":
        return _Rules(url, expires)
    return _Rules(url, expires, refusal=f"{url} not fetched ({why}), so nothing on the host is allowed")


def _location_pattern(location: str) -> re.Pattern[str]:
    """A robots.txt-style path pattern (`*` any characters, a final `$` the end) as a regex."""
    anchored = location.endswith("$")
    body = location[:-1] if anchored else location
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("$" if anchored else ""))


def _tdmrep_rules(url: str, status: int | None, body: bytes, why: str, unreachable: str) -> _Rules:
    expires = time.monotonic() + OPT_OUT_TTL
    if (failed := _unanswered(url, status, why, unreachable)) is not None:
        return failed
    if status is not None and 200 <= status < 300:
        rules = []
        try:
            entries = json.loads(body.decode("utf-8", "replace"))
        except ValueError:  # malformed: no statement
            return _Rules(url, expires, parsed=[])
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
                continue
            reserved = str(entry.get("tdm-reservation", "0")).strip() == "1"
            location = entry["location"] if entry["location"].startswith("/") else "/" + entry["location"]
            rules.append((_location_pattern(location), reserved, entry["location"]))
        return _Rules(url, expires, parsed=rules)
    if status is not None and 300 <= status < 500 and status != 429:
        return _Rules(url, expires, parsed=[])
    if unreachable == "allow":
        return _Rules(url, expires, parsed=[])
    return _Rules(url, expires, refusal=f"{url} not fetched ({why}), so nothing on the host is allowed")


# ---------------------------------------------------------------------------- hosts


class _Host:
    """One host's politeness state, shared by the worker's threads."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.active = 0
        self.next_start = 0.0
        self.paused_until = 0.0
        self.failures = 0  # consecutive
        self.backoffs = 0  # consecutive 429/503, for the exponential pause
        self.given_up: str | None = None


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date), None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


# Gates by key in processes that received one pickled (img2dataset's pool of download processes): the
# tasks a process runs share its robots.txt cache and host limits.
_GATES: dict[str, HostGate] = {}
_GATES_LOCK = threading.Lock()


def _gate_for(key: str, manners: Manners, policy: UrlPolicy, shard: Any) -> HostGate:
    with _GATES_LOCK:
        gate = _GATES.get(key)
        if gate is None:
            gate = _GATES[key] = HostGate(manners, policy, key=key)
    gate.begin_shard(shard)
    return gate


class HostGate:
    """Opt-outs and politeness for one worker's requests (thread-safe; see the module docstring)."""

    def __init__(self, manners: Manners, policy: UrlPolicy, key: str = "") -> None:
        self.manners = manners
        self.policy = policy
        self.key = key or f"gate-{id(self)}-{time.monotonic_ns()}"
        self._lock = threading.Lock()
        self._hosts: dict[str, _Host] = {}
        self._robots: dict[str, _Rules] = {}
        self._tdmrep: dict[str, _Rules] = {}
        self._crawl_delay: dict[str, float] = {}
        self._fetching: dict[tuple[str, str], threading.Lock] = {}
        self._dns: dict[tuple[str, int], tuple[float, Any]] = {}
        self._pending = threading.local()  # hosts whose slot this thread holds with no response yet
        self.shard: Any = None

    def __reduce__(self) -> tuple[Callable[..., HostGate], tuple]:
        return _gate_for, (self.key, self.manners, self.policy, self.shard)

    def begin_shard(self, shard: Any) -> None:
        """A new shard starts: hosts given up (and failure counts) are forgotten; caches are kept."""
        with self._lock:
            if shard == self.shard:
                return
            self.shard = shard
            self._hosts = {name: h for name, h in self._hosts.items() if h.active}
            for h in self._hosts.values():
                h.failures, h.given_up = 0, None

    # ------------------------------------------------------------------ DNS
    def resolve(self, host: str, port: int, family: int = 0, kind: int = 0, *args: Any) -> Any:
        """`socket.getaddrinfo` with this worker's cache (answers for DNS_TTL, failures for DNS_FAILURE_TTL)."""
        key = (host, port)
        now = time.monotonic()
        hit = self._dns.get(key)
        if hit is not None and hit[0] > now:
            if isinstance(hit[1], OSError):
                raise hit[1]
            return hit[1]
        try:
            answer: Any = socket.getaddrinfo(host, port, family, kind, *args)
            expires = now + DNS_TTL
        except OSError as e:
            answer, expires = e, now + DNS_FAILURE_TTL
        with self._lock:
            self._dns[key] = (expires, answer)
            _trim(self._dns)
        if isinstance(answer, OSError):
            raise answer
        return answer

    # ------------------------------------------------------------------ before a request
    def admit(self, req: urllib.request.Request, optout_fetch: bool) -> None:
        """Wait for the host's turn, or raise UrlRefused (opt-out, host given up, address refused)."""
        parts = urllib.parse.urlsplit(req.full_url)
        host = (parts.hostname or "").lower()
        req.crawl_host = host  # type: ignore[attr-defined]  # for on_response: one URL parse per request
        state = self._host(host)
        if state.given_up:
            raise UrlRefused(f"{GIVEN_UP_STATUS}: {state.given_up}", self.policy.tag)
        if not optout_fetch:
            # scheme://host[:port]: user info in a URL is not part of the site whose files decide
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
            name = f"[{host}]" if ":" in host else host
            origin = f"{parts.scheme.lower()}://{name}" + (f":{parts.port}" if parts.port else "")
            if self.manners.robots or self.manners.tdmrep:
                # A host the URL policy refuses gets that refusal, not a robots.txt verdict.
                self.policy.check_address(host, port, self.resolve)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            if self.manners.robots:
                self._check_robots(origin, req.full_url)
            if self.manners.tdmrep:
                self._check_tdmrep(origin, path)
        self._acquire(host, state)

    def _check_robots(self, origin: str, url: str) -> None:
        rules = self._rules("robots", origin)
        if rules.unanswered:
            raise urllib.error.URLError(rules.unanswered)
        if rules.refusal:
            raise UrlRefused(f"robots: {rules.refusal}", self.policy.tag)
        if rules.parsed is not None and not rules.parsed.can_fetch(url, self.manners.token):
            raise UrlRefused(
                f"robots: {rules.url} disallows this path for user-agent {self.manners.token}",
                self.policy.tag,
            )

    def _check_tdmrep(self, origin: str, path: str) -> None:
        rules = self._rules("tdmrep", origin)
        if rules.unanswered:
            raise urllib.error.URLError(rules.unanswered)
        if rules.refusal:
            raise UrlRefused(f"tdm_reservation: {rules.refusal}", self.policy.tag)
        for pattern, reserved, location in rules.parsed:
            if pattern.match(path):
                if reserved:
                    raise UrlRefused(
                        f"tdm_reservation: {rules.url} reserves TDM rights for location {location!r}",
                        self.policy.tag,
                    )
                return

    def _rules(self, kind: str, origin: str) -> _Rules:
        """The origin's robots.txt or tdmrep.json, fetched by one thread while the others wait for it."""
        cache = self._robots if kind == "robots" else self._tdmrep
        hit = cache.get(origin)
        if hit is not None and hit.expires > time.monotonic():
            return hit
        with self._lock:
            fetching = self._fetching.setdefault((kind, origin), threading.Lock())
        with fetching:
            hit = cache.get(origin)
            if hit is not None and hit.expires > time.monotonic():
                return hit
            rules = self._fetch_rules(kind, origin)
            with self._lock:
                cache[origin] = rules
                _trim(cache)
                self._fetching.pop((kind, origin), None)
        return rules

    def _fetch_rules(self, kind: str, origin: str) -> _Rules:
        url = origin + ("/robots.txt" if kind == "robots" else "/.well-known/tdmrep.json")
        status: int | None = None
        body = b""
        try:
            status, body = self.policy.fetch_head(
                url,
                limit=OPT_OUT_MAX_BYTES,
                timeout=self.manners.timeout,
                gate=self,
                user_agent=self.manners.user_agent,
            )
            why = f"HTTP {status}"
        except UrlRefused as e:  # a redirect to a refused scheme or address, or a host given up
            why = e.reason
        except (OSError, ValueError, urllib.error.URLError) as e:  # timeouts, resets, bad status lines
            reason = getattr(e, "reason", None) or e
            why = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
        except Exception as e:  # http.client's protocol errors are not OSErrors
            why = f"{type(e).__name__}: {e}"
        make = _robots_rules if kind == "robots" else _tdmrep_rules
        rules = make(url, status, body, why, self.manners.unreachable)
        if kind == "robots" and rules.parsed is not None:
            delay = rules.parsed.crawl_delay(self.manners.token)
            if delay:
                host = (urllib.parse.urlsplit(origin).hostname or "").lower()
                with self._lock:
                    self._crawl_delay[host] = min(float(delay), self.manners.max_crawl_delay)
                    _trim(self._crawl_delay)
        return rules

    # ------------------------------------------------------------------ slots
    def _host(self, host: str) -> _Host:
        with self._lock:
            state = self._hosts.get(host)
            if state is None:
                state = self._hosts[host] = _Host(host)
                if len(self._hosts) > MAX_REMEMBERED:  # forget idle hosts, oldest first
                    for name in [n for n, h in self._hosts.items() if not h.active][: MAX_REMEMBERED // 10]:
                        del self._hosts[name]
                    self._hosts[host] = state
            return state

    def _acquire(self, host: str, state: _Host) -> None:
        m = self.manners
        interval = max(0.0 if m.max_rate is None else 1.0 / m.max_rate, self._crawl_delay.get(host, 0.0))
        with state.cond:
            while m.max_concurrent is not None and state.active >= m.max_concurrent:
                state.cond.wait()
            if state.given_up:  # while this thread waited for a slot
                state.cond.notify()
                raise UrlRefused(f"{GIVEN_UP_STATUS}: {state.given_up}", self.policy.tag)
            state.active += 1
            start = max(time.monotonic(), state.next_start, state.paused_until)
            state.next_start = start + interval
        pending = getattr(self._pending, "hosts", None)
        if pending is None:
            pending = self._pending.hosts = []
        pending.append(state)
        # A pause set while this thread waited (a 429 from another thread) holds it too.
        while (wait := max(start, state.paused_until) - time.monotonic()) > 0:
            time.sleep(wait)
            start = state.paused_until

    def _release(self, state: _Host) -> None:
        with state.cond:
            state.active -= 1
            state.cond.notify()

    def _take_pending(self, state: _Host | None = None) -> list[_Host]:
        pending = getattr(self._pending, "hosts", None) or []
        if state is None:
            self._pending.hosts = []
            return pending
        if state in pending:
            pending.remove(state)
            return [state]
        return []

    # ------------------------------------------------------------------ after a request
    def on_response(self, req: urllib.request.Request, response: Any, optout_fetch: bool) -> Any:
        """Account for the response; check its opt-out headers before its body is read."""
        host = (
            getattr(req, "crawl_host", None) or (urllib.parse.urlsplit(req.full_url).hostname or "").lower()
        )
        state = self._host(host)
        held = self._take_pending(state)
        code = getattr(response, "status", None) or response.getcode() or 200
        if code in BACKOFF_CODES or code >= 500:
            self._failed(host, state, code, response.headers)
        else:
            with state.cond:
                state.failures = state.backoffs = 0
        refusal = None
        if not optout_fetch and 200 <= code < 300:
            refusal = self._header_refusal(response.headers)
        if refusal or code >= 400 or not held:
            # An error's body is not read (urllib raises), a refusal's is never read: the slot ends here.
            for s in held:
                self._release(s)
            if refusal:
                response.close()
                raise UrlRefused(refusal, self.policy.tag)
            return response
        _release_on_close(response, lambda: self._release(state))
        return response

    def on_error(self, error: BaseException) -> None:
        """The request failed before a response: its slot ends, and the host failed unless we refused."""
        for state in self._take_pending():
            self._release(state)
            if not isinstance(error, UrlRefused):
                self._failed(state.name, state, None, None)

    def _failed(self, host: str, state: _Host, code: int | None, headers: Any) -> None:
        m = self.manners
        with state.cond:
            state.failures += 1
            if code in BACKOFF_CODES:
                state.backoffs += 1
                asked = _retry_after(headers.get("Retry-After") if headers is not None else None)
                pause = asked if asked is not None else 2.0 ** min(state.backoffs - 1, 10)
                state.paused_until = max(state.paused_until, time.monotonic() + min(pause, m.max_retry_after))
            if m.max_failures is not None and state.failures >= m.max_failures and not state.given_up:
                what = f"HTTP {code}" if code else "no response"
                state.given_up = (
                    f"{host} given up for the rest of the shard after {state.failures} consecutive "
                    f"failures (last: {what}; download.host_max_failures)"
                )

    def should_retry(self, error: urllib.error.HTTPError, attempt: int) -> bool:
        """Retry a 429/503 after the pause it set, unless its Retry-After is longer than we wait."""
        if error.code not in BACKOFF_CODES or attempt >= self.manners.backoff_retries:
            return False
        asked = _retry_after(error.headers.get("Retry-After") if error.headers is not None else None)
        if asked is not None and asked > self.manners.max_retry_after:
            return False
        host = (urllib.parse.urlsplit(error.url or "").hostname or "").lower()
        state = self._hosts.get(host)
        return state is None or not state.given_up

    def _header_refusal(self, headers: Any) -> str | None:
        m = self.manners
        if m.tdmrep and str(headers.get("tdm-reservation", "")).strip() == "1":
            policy = headers.get("tdm-policy")
            return "tdm_reservation: the response's tdm-reservation header is 1" + (
                f" (policy {policy})" if policy else ""
            )
        for value in headers.get_all("X-Robots-Tag") or []:
            agent, sep, rest = value.partition(":")
            directives = rest if sep and TOKEN_RE.fullmatch(agent.strip()) else value
            if sep and TOKEN_RE.fullmatch(agent.strip()) and agent.strip().lower() != m.token.lower():
                continue  # addressed to another agent
            found = {d.strip().lower() for d in directives.split(",")} & m.x_robots_directives
            if found:
                return f"x_robots_tag: X-Robots-Tag {', '.join(sorted(found))}"
        return None


def _release_on_close(response: Any, release: Callable[[], None]) -> None:
    """Call `release` once, when the response is closed (img2dataset reads it in a `with`)."""
    close = response.close
    done = threading.Event()

    def closing() -> None:
        try:
            close()
        finally:
            if not done.is_set():
                done.set()
                release()

    response.close = closing


def _trim(cache: dict) -> None:
    """Keep a per-worker cache bounded: the oldest tenth goes beyond MAX_REMEMBERED entries."""
    if len(cache) > MAX_REMEMBERED:
        for key in list(cache)[: MAX_REMEMBERED // 10]:
            del cache[key]
