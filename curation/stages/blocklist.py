"""Hash blocklists: drop images (and URLs) that lists a team obtained name, before any byte is written.

Lists come from child-safety organisations and hash-sharing programmes (NCMEC, IWF, Thorn's
Safer, Meta's ThreatExchange, Microsoft's PhotoDNA through its partners: never public; see
docs/responsible.md for how a team gets them). This stage takes them in the forms they come in:

    md5 / sha1 / sha256   hex digests of the image file's bytes, exactly as fetched
    pdq                   Meta's 256-bit perceptual hash (64 hex digits, curation.core.pdq),
                          matched within `pdq_distance` bits
    url                   exact URLs
    domain                host names; a listed domain matches its subdomains too

Each list is a text file (a local path or a URL, read through the storage layer and fingerprinted
by content like a model file): one entry a line, blank lines and `#` comments skipped, the entry
being the line's first comma-, tab- or space-separated field (ThreatExchange's `hash,quality`
CSV and `md5sum` output both read as they are). A malformed entry fails `curate validate` naming
the file and line: a list silently read as empty would let everything through.

Where a match happens, so that a matched image's bytes are never written anywhere:
- the stage comes before `download` (build_stages refuses it after): URL and domain lists are
  matched here, before the image is requested at all (the row is dropped, the cascade keeps the
  download from fetching it);
- the download stage screens every fetched image's bytes with this stage's lists inside
  img2dataset, before its resizer and writer (`_HeaderCheckedResizer`): a matched image never
  reaches a tar; the row gets status `blocklisted`, error_message `LIST (KIND)`, drop reason
  `blocklist`;
- on inputs that bring their images (webdataset, image_folder) the stage matches the bytes here,
  and `curate select` never writes a dropped row.
The manifest records which list matched and how (`blocklist_match`, `blocklist_kind`,
`blocklist_distance`), never the image.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from curation.core.imageio import DEFAULT_MAX_PIXELS
from curation.core.params import param
from curation.stages.base import Stage, column_values

BLOCKLIST_COLUMNS: dict[str, pa.DataType] = {
    "blocklist_match": pa.string(),  # the name of the list that matched (its file name); null: none did
    "blocklist_kind": pa.string(),  # md5 | sha1 | sha256 | pdq | url | domain
    "blocklist_distance": pa.int32(),  # PDQ bits apart (0 for exact kinds)
}
DIGEST_KINDS = {"md5": 32, "sha1": 40, "sha256": 64}
KINDS = (*DIGEST_KINDS, "pdq", "url", "domain")
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$"
)


class Match(NamedTuple):
    list_name: str
    kind: str
    distance: int = 0

    def describe(self) -> str:
        return f"{self.list_name} ({self.kind}{f', {self.distance} bits' if self.kind == 'pdq' else ''})"


class BlocklistError(Exception):
    """A list that cannot be read or has a malformed entry (one line, naming the file and line)."""


@dataclass(frozen=True)
class HashBlocklistParams:
    # Lists by kind: each a local path or a URL (s3://...), one entry a line.
    md5: list[str] = field(default_factory=list)
    sha1: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    pdq: list[str] = field(default_factory=list)
    url: list[str] = field(default_factory=list)
    domain: list[str] = field(default_factory=list)
    # PDQ bits (of 256) within which an image matches a listed hash; 31 is Meta's suggested threshold.
    pdq_distance: int = param(31, ge=0, le=128)
    # Images whose header declares more pixels are not decoded for PDQ (their digests still match).
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)


class Blocklists:
    """The loaded lists and the matching; built from local files (`paths`: kind -> [(name, path)])."""

    def __init__(self, paths: dict[str, list[tuple[str, str]]], pdq_distance: int, max_pixels: int) -> None:
        self.pdq_distance = pdq_distance
        self.max_pixels = max_pixels
        self.digests: dict[str, dict[str, str]] = {k: {} for k in DIGEST_KINDS}  # kind -> hex -> list
        self.urls: dict[str, str] = {}
        self.domains: dict[str, str] = {}
        pdq_hex: list[str] = []
        pdq_names: list[str] = []
        for kind, lists in paths.items():
            for name, path in lists:
                entries = _entries(path)
                if not entries:  # a list read as empty would let everything through unnoticed
                    raise BlocklistError(f"{name}: the list is empty")
                for line_no, entry in entries:
                    where = f"{name} line {line_no}"
                    if kind in DIGEST_KINDS:
                        if len(entry) != DIGEST_KINDS[kind] or not _HEX.match(entry):
                            raise BlocklistError(f"{where}: not a {kind} hex digest: {entry[:80]!r}")
                        self.digests[kind].setdefault(entry.lower(), name)
                    elif kind == "pdq":
                        if len(entry) != 64 or not _HEX.match(entry):
                            raise BlocklistError(f"{where}: not a PDQ hash (64 hex digits): {entry[:80]!r}")
                        pdq_hex.append(entry.lower())
                        pdq_names.append(name)
                    elif kind == "url":
                        if not urlsplit(entry).scheme:
                            raise BlocklistError(f"{where}: not a URL: {entry[:80]!r}")
                        self.urls.setdefault(entry, name)
                    else:
                        domain = entry.lower().rstrip(".")
                        if not _DOMAIN.match(domain):
                            raise BlocklistError(f"{where}: not a domain name: {entry[:80]!r}")
                        self.domains.setdefault(domain, name)
        from curation.core.pdq import parse_hex

        self.pdq = parse_hex(pdq_hex)
        self.pdq_names = pdq_names

    @property
    def wants_bytes(self) -> bool:
        return any(self.digests.values()) or len(self.pdq) > 0

    def match_url(self, url: str | None) -> Match | None:
        if not url:
            return None
        if url in self.urls:
            return Match(self.urls[url], "url")
        if self.domains:
            try:
                host = (urlsplit(url).hostname or "").rstrip(".")
            except ValueError:
                return None
            parts = host.split(".")
            for i in range(len(parts)):  # the host, then each parent domain
                name = self.domains.get(".".join(parts[i:]))
                if name is not None:
                    return Match(name, "domain")
        return None

    def match_bytes(self, data: bytes | None) -> Match | None:
        """The first list that names these image bytes: exact digests first, then PDQ."""
        if not data:
            return None
        for kind, table in self.digests.items():
            if table:
                name = table.get(hashlib.new(kind, data).hexdigest())
                if name is not None:
                    return Match(name, kind)
        if len(self.pdq) == 0:
            return None
        from curation.core.imageio import ImageRefused, open_image
        from curation.core.pdq import distances, parse_hex, pdq_image

        try:
            image = open_image(data, self.max_pixels)
        except ImageRefused:
            return None  # not decodable: no perceptual hash (its digests were checked above)
        d = distances(parse_hex([pdq_image(image)[0]]), self.pdq)[0]
        best = int(np.argmin(d))
        if d[best] <= self.pdq_distance:
            return Match(self.pdq_names[best], "pdq", int(d[best]))
        return None


def _entries(path: str) -> list[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BlocklistError(f"cannot read {path}: {e}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append((i, re.split(r"[,\t ]", line, maxsplit=1)[0]))
    return out


class HashBlocklist(Stage):
    """Drop rows whose URL, domain or image bytes a user-supplied list names (reason `blocklist`)."""

    name = "hash_blocklist"
    columns: ClassVar[dict[str, pa.DataType]] = BLOCKLIST_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {"blocklist_distance": (0, 256, 1)}  # PDQ bits
    cascade = True
    # Where the rows have no images yet (URL input), only URL and domain lists apply here; the download
    # stage screens the bytes it fetches with this stage's lists (build_stages wires it).
    needs_images = False
    # Where the lists lie is left out of the run's fingerprint; their contents are in `fingerprint()`.
    model_file_params = KINDS
    Params = HashBlocklistParams

    def __init__(self, params: HashBlocklistParams, context: Any) -> None:
        super().__init__(params, context)
        self._lists: Blocklists | None = None

    def __getstate__(self) -> dict:
        # Sent to workers (Ray actors, processes) without the loaded lists: each loads them once.
        return {**self.__dict__, "_lists": None}

    def _local_paths(self) -> dict[str, list[tuple[str, str]]]:
        p = self.params
        out: dict[str, list[tuple[str, str]]] = {}
        for kind in KINDS:
            out[kind] = [
                (loc.rstrip("/").rsplit("/", 1)[-1], self.model_path(loc)) for loc in getattr(p, kind)
            ]
        return out

    @property
    def lists(self) -> Blocklists:
        if self._lists is None:
            self._lists = Blocklists(self._local_paths(), self.params.pdq_distance, self.params.max_pixels)
        return self._lists

    def setup(self) -> None:
        _ = self.lists

    def check(self) -> list[str]:
        from curation.models.files import ModelFileError

        if not any(getattr(self.params, kind) for kind in KINDS):
            return ["no lists: name at least one file under md5, sha1, sha256, pdq, url or domain"]
        try:
            _ = self.lists
        except (BlocklistError, ModelFileError) as e:
            return [str(e)]
        return []

    def fingerprint(self) -> dict[str, Any]:
        """Each list's content hash: a list that changed would drop other rows (the dataset card shows them)."""
        from curation.models.checkpoints import file_sha256

        return {
            kind: {name: file_sha256(path) for name, path in lists}
            for kind, lists in self._local_paths().items()
            if lists
        }

    def compute(self, table: pa.Table) -> pa.Table:
        lists = self.lists
        urls = column_values(table, "url")
        images = column_values(table, "image")
        matches: list[Match | None] = []
        for url, data in zip(urls, images):
            matches.append(lists.match_url(url) or lists.match_bytes(data))
        return pa.table(
            {
                "blocklist_match": pa.array([m.list_name if m else None for m in matches], pa.string()),
                "blocklist_kind": pa.array([m.kind if m else None for m in matches], pa.string()),
                "blocklist_distance": pa.array([m.distance if m else None for m in matches], pa.int32()),
            }
        )

    def decide(self, table: pa.Table) -> pa.Array:
        import pyarrow.compute as pc

        matched = table.column("blocklist_match")
        return pc.if_else(pc.is_valid(matched), pa.scalar("blocklist"), pa.scalar(None, pa.string()))
