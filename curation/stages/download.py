"""Download images with img2dataset (its downloader, resizer and webdataset writer).

Each batch the stage sees becomes one small img2dataset job: the batch's rows
are written as img2dataset input shards, img2dataset's own `Downloader`
fetches, resizes and writes them as webdataset tars plus its per-sample Parquet
and `_stats.json`, and the stage reads img2dataset's per-sample record back into
the manifest, joined on img2dataset's `key`.

Why not `img2dataset.download(...)` per batch: it starts a logger process and a
`spawn` pool, each of which re-imports img2dataset (and through webdataset,
torch): 10+ seconds per batch on a loaded machine, for nothing, since our
runners already spread shards over processes. `processes_count > 1` uses a
`spawn` pool like img2dataset's multiprocessing distributor, whose processes die
with the process that started them (`curation.core.processes`): a `kill -9` of
`curate run` leaves no download process behind.

Image layout (see docs/images.md):

    <output>/images/shard-00003/<batch>/00000.tar        img2dataset webdataset shard
    <output>/images/shard-00003/<batch>/00000.parquet    img2dataset per-sample record
    <output>/images/shard-00003/<batch>/00000_stats.json
    <output>/images/shard-00003/.tmp-<batch>/            a batch being downloaded

`<batch>` is a hash of the batch's uids, so a re-run of a killed shard maps each
batch to the same directory and replaces it. A batch is downloaded into
`.tmp-<batch>` and renamed into place when complete, so a tar at a final path
is never truncated; and only committed manifests point at tars, so images of a
shard that never committed are never read by `curate select`.

An output on object storage (s3://...) has the same layout under its prefix: the
batch is downloaded into this machine's staging folder, and each file is put whole
through `curation.core.storage` (one PUT, or a multipart upload completed only when
every part is in) before `compute` returns, so before the shard's manifest and ledger
entry are committed. A re-run of a shard that never committed puts the same keys
again, replacing what a killed attempt left.

Untrusted input, refused per row and never as a shard failure:
- URLs go through `curation.core.urlpolicy` (img2dataset fetches with
  `urllib.request.urlopen`; the policy's opener is installed around each
  img2dataset job): http(s) only, `file:` only under `allow_local`, no
  non-public address unless `allow_private_addresses`. Status `refused`.
- Images whose header declares more than `max_pixels` are refused before
  img2dataset decodes them (`curation.core.imageio.image_size`). Status `too_large`.
- A response declaring more than `max_bytes` is refused before its body is
  read, and one that sends more is cut off there. Status `too_large`.
- A request taking longer than `total_timeout` seconds in all (img2dataset's
  `timeout` bounds each socket read only, so a server sending a byte a second
  never times out) is cut off. Status `failed_to_download`, "timed out after
  Ns total".
- With a `hash_blocklist` stage in the pipeline, every fetched image's bytes are matched
  against its lists before img2dataset resizes or writes them: a matched image is never
  written. Status `blocklisted`, error_message the list's name and kind; reason `blocklist`.

Opt-outs and politeness (`curation.core.crawl`, docs/optouts.md): every http(s) request passes the
worker's `HostGate`, which refuses rows that robots.txt (`robots`), TDMRep (`tdm_reservation`) or
X-Robots-Tag (`x_robots_tag`) opt out, caps requests per host, backs off on 429/503 and gives up on a
host that keeps failing (`host_given_up`).

Refusals reach the manifest as img2dataset error messages starting with a random
per-stage tag, which no server can forge, and become these statuses here.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import __version__
from curation.core.crawl import OPT_OUT_STATUSES, TOKEN_RE, HostGate, Manners, user_agent
from curation.core.imageio import DEFAULT_MAX_PIXELS, ImageRefused, image_size
from curation.core.params import param
from curation.core.shards import read_samples
from curation.core.storage import Store, open_store
from curation.core.urlpolicy import UrlPolicy, local_folders, parse_networks
from curation.schema import IMAGE_COLUMNS
from curation.stages.base import Resources, Stage, StageContext

# img2dataset's per-sample columns we carry, under img2dataset's names.
I2D_COLUMNS: dict[str, pa.DataType] = {
    # success | failed_to_download | failed_to_resize; our refusals: refused | too_large | robots |
    # tdm_reservation | x_robots_tag | host_given_up
    "status": pa.string(),
    "error_message": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "sha256": pa.string(),  # of the downloaded bytes, before resizing
}
# Provenance (the selected samples' .json carry them): when this batch was fetched (its start, UTC:
# img2dataset records no per-request time), and the HTTP status, where known (200 for a success,
# the code of an "HTTP Error NNN" img2dataset recorded; null for a connection error or a refusal).
PROVENANCE_COLUMNS: dict[str, pa.DataType] = {
    "fetched_at": pa.timestamp("s", tz="UTC"),
    "http_status": pa.int32(),
}
DOWNLOAD_COLUMNS: dict[str, pa.DataType] = {**I2D_COLUMNS, **PROVENANCE_COLUMNS, **IMAGE_COLUMNS}
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
# img2dataset's shard-number width in file names (its `oom_shard_count` default).
OOM_SHARD_COUNT = 5
# A contact URL goes into a header: no spaces, no control characters.
_CONTACT_RE = re.compile(r"(https?://|mailto:)[!-~]+")


@dataclass(frozen=True)
class DownloadParams:
    """img2dataset's parameters, with img2dataset's defaults (see `img2dataset.download`)."""

    image_size: int = param(256, ge=1)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "border"
    resize_only_if_bigger: bool = False
    upscale_interpolation: Literal[
        "nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"
    ] = "lanczos"
    downscale_interpolation: Literal[
        "nearest", "linear", "bilinear", "cubic", "bicubic", "area", "lanczos", "lanczos4"
    ] = "area"
    encode_quality: int = param(95, ge=0, le=100, hint="PNG compression 0..9 with encode_format png")
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    skip_reencode: bool = False
    disable_all_reencoding: bool = False
    min_image_size: int = param(0, ge=0)
    # null: no limit (img2dataset's default is infinity, which YAML cannot spell portably)
    max_image_area: float | None = param(None, gt=0)
    max_aspect_ratio: float | None = param(None, gt=0)
    extract_exif: bool = True
    processes_count: int = param(1, ge=1)
    thread_count: int = param(256, ge=1)
    # Seconds per socket operation (img2dataset's `timeout`).
    timeout: int = param(10, ge=1)
    # Seconds per request in all, from connect to the last byte, redirects included.
    total_timeout: float = param(60, gt=0)
    # Bytes per response; more is refused (`too_large`). Images above 32 MiB are rare and suspect.
    max_bytes: int = param(32 * 2**20, ge=1)
    retries: int = param(0, ge=0)
    max_shard_retry: int = param(1, ge=0)
    # --- opt-outs and politeness (docs/optouts.md) ---
    # The product token sent in every request's User-Agent and matched in robots.txt and X-Robots-Tag.
    user_agent_token: str = "curate"
    # Where a site owner reaches whoever runs the crawl (https://... or mailto:...), sent in the User-Agent.
    contact_url: str | None = None
    # null: img2dataset's default [noai, noimageai, noindex, noimageindex]; []: honour none
    disallowed_header_directives: list[str] | None = None
    # Rows a host's robots.txt disallows for user_agent_token are not fetched (status `robots`).
    respect_robots_txt: bool = True
    # TDMRep: /.well-known/tdmrep.json and the tdm-reservation header (status `tdm_reservation`).
    respect_tdmrep: bool = True
    # A robots.txt or tdmrep.json answering 5xx/429 or not at all: refuse the host's rows, or allow them.
    optouts_unreachable: Literal["refuse", "allow"] = "refuse"
    # Per host and worker: requests in flight, request starts a second (null: no limit).
    host_max_concurrent: int | None = param(4, ge=1)
    host_max_rate: float | None = param(10, gt=0)
    # A robots.txt Crawl-delay is honoured up to this many seconds.
    max_crawl_delay: float = param(10, ge=0)
    # 429/503: the host pauses for Retry-After (at most this long; exponential without one) and the row is
    # retried up to backoff_retries times; a longer Retry-After fails the row.
    max_retry_after: float = param(60, ge=0)
    backoff_retries: int = param(2, ge=0)
    # Consecutive failures after which a host is given up for the rest of the shard (`host_given_up`).
    host_max_failures: int | None = param(10, ge=1)
    # Folders whose files `file:` URLs may read (real paths checked: no `..` or symlink escape);
    # null: file: URLs are refused. Relative to the working directory.
    allow_local: list[str] | None = None
    # Addresses that are not public (private, loopback, link-local, ...: 169.254.169.254 is a
    # cloud VM's metadata service): false refuses them, true allows them, a list of networks
    # (["10.1.0.0/16"]) allows those.
    allow_private_addresses: bool | list[str] = False
    # Images whose header declares more pixels are refused before decoding (`too_large`).
    max_pixels: int = param(DEFAULT_MAX_PIXELS, ge=1)


class Download(Stage):
    """Download the images of rows still kept; failures become `status`/`error_message` values."""

    name = "download"
    provides_images = True
    packages: ClassVar[dict[str, str]] = {"img2dataset": "pip install 'curate[images]'"}
    columns: ClassVar[dict[str, pa.DataType]] = DOWNLOAD_COLUMNS
    bins: ClassVar[dict[str, tuple[float, float, float]]] = {
        **{c: (0, 8192, 8) for c in ("width", "height", "original_width", "original_height")},
        "http_status": (100, 600, 1),
    }
    cascade = True
    Params = DownloadParams

    def __init__(self, params: DownloadParams, context: StageContext) -> None:
        super().__init__(params, context)
        # Marks our own refusals inside img2dataset's error messages (see the module docstring).
        self.tag = f"curate-{secrets.token_hex(8)}:"
        self._store: Store | None = None  # opened on first use: validation builds stages without a store
        # The hash_blocklist stage whose lists screen every fetched image before img2dataset writes it
        # (set by curation.stages.build_stages; curation/stages/blocklist.py).
        self.screen: Any = None
        self._gate: HostGate | None = None  # this worker's robots.txt cache and host limits

    @property
    def policy(self) -> UrlPolicy:
        return UrlPolicy(
            allow_local=local_folders(self.params.allow_local),
            allow_private=parse_networks(self.params.allow_private_addresses),
            tag=self.tag,
            total_timeout=self.params.total_timeout,
            max_bytes=self.params.max_bytes,
        )

    @property
    def gate(self) -> HostGate:
        """Opt-outs and politeness, shared by the download threads (and kept across batches) of this worker."""
        if self._gate is None:
            p = self.params
            directives = p.disallowed_header_directives
            if directives is None:
                directives = ["noai", "noimageai", "noindex", "noimageindex"]
            manners = Manners(
                user_agent=user_agent(p.user_agent_token, __version__, p.contact_url),
                token=p.user_agent_token,
                robots=p.respect_robots_txt,
                tdmrep=p.respect_tdmrep,
                x_robots_directives=frozenset(d.strip().lower() for d in directives),
                unreachable=p.optouts_unreachable,
                timeout=p.timeout,
                max_concurrent=p.host_max_concurrent,
                max_rate=p.host_max_rate,
                max_crawl_delay=p.max_crawl_delay,
                max_retry_after=p.max_retry_after,
                backoff_retries=p.backoff_retries,
                max_failures=p.host_max_failures,
            )
            self._gate = HostGate(manners, self.policy, key=f"{self.tag}{os.getpid()}")
        return self._gate

    @property
    def resources(self) -> Resources:
        # Network-bound: one core drives `thread_count` download threads.
        return Resources(cpus=1, gpus=0)

    def setup(self) -> None:
        import img2dataset  # noqa: F401 - slow import (torch via webdataset): pay it once per worker

        if self.screen is not None:
            self.screen.setup()  # load the lists once per worker, not in a download thread

    def check(self) -> list[str]:
        p = self.params
        problems = []
        if p.encode_format == "png" and p.encode_quality > 9:
            problems.append("encode_quality is PNG compression for encode_format png: 0..9")
        for folder in p.allow_local or []:
            if not Path(folder).is_dir():
                problems.append(f"allow_local: {folder!r} is not a folder")
        try:
            parse_networks(p.allow_private_addresses)
        except ValueError as e:
            problems.append(f"allow_private_addresses: {e}")
        if not TOKEN_RE.fullmatch(p.user_agent_token):
            problems.append(
                f"user_agent_token: {p.user_agent_token!r} is not a product token (letters, '-' and '_')"
            )
        if p.contact_url is not None and not _CONTACT_RE.fullmatch(p.contact_url):
            problems.append(
                f"contact_url: {p.contact_url!r} is not an http(s):// or mailto: URL without spaces"
            )
        return problems

    # ------------------------------------------------------------------ compute
    @property
    def store(self) -> Store:
        """Where the image tars go: the run's output (a local directory or a URL)."""
        if self._store is None:
            self._store = open_store(self.context.output_dir, self.context.storage_options)
        return self._store

    def compute(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        shard = table.column("shard")[0].as_py()
        uids = table.column("uid").to_pylist()
        self.gate.begin_shard(shard)  # hosts given up in another shard are tried again
        batch_id = hashlib.sha256(f"{n}\n".encode() + "\n".join(uids).encode()).hexdigest()[:16]
        rel = Path("images") / f"shard-{shard:05d}" / batch_id
        per = max(1, math.ceil(n / self.params.processes_count))
        fetched_at = int(time.time())
        if self.store.local:
            final = Path(self.store.path(str(rel)))
            tmp = final.with_name(f".tmp-{batch_id}")
            n_jobs = self._download_batch(table, tmp, per)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            return self._read_back(final, rel, n, per, n_jobs, fetched_at)
        # Object stores: no rename, so the batch is downloaded here and put whole. Named by output and
        # batch, so a re-run on this machine clears what a killed attempt left.
        where = hashlib.sha256(self.store.url.encode()).hexdigest()[:12]
        tmp = self.store.staging() / f"download-{where}-{shard:05d}-{batch_id}"
        try:
            n_jobs = self._download_batch(table, tmp, per)
            result = self._read_back(tmp, rel, n, per, n_jobs, fetched_at)
            self._upload(tmp, rel, n_jobs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    def _download_batch(self, table: pa.Table, folder: Path, per: int) -> int:
        """img2dataset's files for the batch in local `folder` (emptied first); the number of jobs."""
        # A killed attempt at this very batch may have left a partial directory.
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "_tmp").mkdir(parents=True)
        jobs = self._write_inputs(table, folder, per)
        self._download(jobs, folder, per)
        shutil.rmtree(folder / "_tmp", ignore_errors=True)
        return len(jobs)

    def _upload(self, folder: Path, rel: Path, n_jobs: int) -> None:
        """Put the batch's files whole at the local layout's keys (`_stats.json`, img2dataset's "done"
        marker, last); a transient store error is retried, a lasting one fails the shard."""
        for k in range(n_jobs):
            name = f"{k:0{OOM_SHARD_COUNT}d}"
            for file in (f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"):
                self.store.put_file(folder / file, f"{rel.as_posix()}/{file}")

    def _write_inputs(self, table: pa.Table, tmp: Path, per: int) -> list[tuple[int, str]]:
        """img2dataset input shards (Arrow IPC files, as its Reader writes them): uid, caption, url."""
        cols = pa.table(
            {
                "uid": table.column("uid"),
                "caption": table.column("caption"),
                "url": table.column("url"),
            }
        )
        jobs = []
        for k, start in enumerate(range(0, table.num_rows, per)):
            path = tmp / "_tmp" / f"{k}.feather"
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, cols.schema) as writer:
                writer.write_table(cols.slice(start, per))
            jobs.append((k, str(path)))
        return jobs

    def _downloader(self, output_folder: Path, per: int):
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        p = self.params
        resizer = Resizer(
            image_size=p.image_size,
            resize_mode=p.resize_mode,
            resize_only_if_bigger=p.resize_only_if_bigger,
            upscale_interpolation=p.upscale_interpolation,
            downscale_interpolation=p.downscale_interpolation,
            encode_quality=p.encode_quality,
            encode_format=p.encode_format,
            skip_reencode=p.skip_reencode,
            disable_all_reencoding=p.disable_all_reencoding,
            min_image_size=p.min_image_size,
            max_image_area=float("inf") if p.max_image_area is None else p.max_image_area,
            max_aspect_ratio=float("inf") if p.max_aspect_ratio is None else p.max_aspect_ratio,
        )
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=_HeaderCheckedResizer(resizer, p.max_pixels, self.tag, self._screen_lists()),
            thread_count=p.thread_count,
            save_caption=True,
            extract_exif=p.extract_exif,
            output_folder=str(output_folder),
            column_list=["uid", "caption", "url"],
            timeout=p.timeout,
            number_sample_per_shard=per,
            oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=p.encode_format,
            retries=p.retries,
            # The gate sets the User-Agent and checks X-Robots-Tag (before the body is read, with a status).
            user_agent_token=None,
            disallowed_header_directives=None,
        )
        return _PolicyDownloader(downloader, self.policy, self.gate)

    def _screen_lists(self) -> Any:
        lists = self.screen.lists if self.screen is not None else None
        return lists if lists is not None and lists.wants_bytes else None

    def _download(self, jobs: list[tuple[int, str]], tmp: Path, per: int) -> None:
        downloader = self._downloader(tmp, per)
        if self.params.processes_count > 1 and len(jobs) > 1:
            _pool_download(downloader, jobs, self.params.processes_count, self.params.max_shard_retry)
        else:
            for job in jobs:
                for _ in range(1 + self.params.max_shard_retry):
                    ok, _row = downloader(job)
                    if ok:
                        break
        # img2dataset writes `_stats.json` last: without it the job did not finish.
        missing = [k for k, _ in jobs if not (tmp / f"{k:0{OOM_SHARD_COUNT}d}_stats.json").exists()]
        if missing:
            raise RuntimeError(f"img2dataset failed on {len(missing)} of {len(jobs)} job(s) of this batch")

    def _read_back(self, folder: Path, rel: Path, n: int, per: int, n_jobs: int, fetched_at: int) -> pa.Table:
        """The manifest columns from img2dataset's files of one batch in local `folder`."""
        from img2dataset.downloader import compute_key

        oom_sample = math.ceil(math.log10(per))
        position = {compute_key(i % per, i // per, oom_sample, OOM_SHARD_COUNT): i for i in range(n)}
        out: dict[str, list] = {c: [None] * n for c in DOWNLOAD_COLUMNS}
        ext = self.params.encode_format
        for k in range(n_jobs):
            name = f"{k:0{OOM_SHARD_COUNT}d}"
            meta = pq.read_table(folder / f"{name}.parquet", columns=["key", *I2D_COLUMNS]).to_pylist()
            images = _tar_members(folder / f"{name}.tar", ext)
            tar_rel = str(rel / f"{name}.tar")
            for m in meta:
                i = position[m["key"]]
                for c in ("key", *I2D_COLUMNS):
                    out[c][i] = m[c]
                if m["key"] in images:
                    out["image"][i] = images[m["key"]]
                    out["image_path"][i] = tar_rel
        for i in range(n):
            if out["status"][i] is None:  # img2dataset logs and skips a sample whose handling raised
                out["status"][i] = "failed_to_download"
                out["error_message"][i] = "img2dataset wrote no record for this sample"
            message = out["error_message"][i]
            if message and message.startswith(self.tag):  # our refusal, not a network or decoder error
                status, _, detail = message[len(self.tag) :].partition(": ")
                out["status"][i], out["error_message"][i] = status, detail
            out["fetched_at"][i] = fetched_at
            code = _HTTP_ERROR.match(message or "") if out["status"][i] != "success" else None
            out["http_status"][i] = 200 if out["status"][i] == "success" else int(code[1]) if code else None
        return pa.table({c: pa.array(out[c], t) for c, t in DOWNLOAD_COLUMNS.items()})

    # ------------------------------------------------------------------ decide
    def decide(self, table: pa.Table) -> pa.Array:
        status = table.column("status")
        undecodable = pc.is_in(status, value_set=pa.array(["failed_to_resize", "too_large"]))
        opted_out = pc.is_in(status, value_set=pa.array(OPT_OUT_STATUSES))
        reason = pc.case_when(
            pc.make_struct(
                pc.equal(status, "blocklisted"), opted_out, undecodable, pc.not_equal(status, "success")
            ),
            pa.scalar("blocklist"),
            pa.scalar("opt_out"),
            pa.scalar("decode"),
            pa.scalar("download"),
        )
        # null status: the row was not requested (cascade), so this stage has no say.
        return reason


def _pool_download(downloader: Any, jobs: list, processes: int, max_shard_retry: int) -> None:
    """img2dataset's multiprocessing distributor (a `spawn` pool, failed jobs retried), with
    processes that die with this one."""
    import multiprocessing

    from curation.core.processes import die_with_parent

    with multiprocessing.get_context("spawn").Pool(
        processes, initializer=die_with_parent, initargs=(os.getpid(),), maxtasksperchild=5
    ) as pool:
        todo = jobs
        for _ in range(1 + max_shard_retry):
            todo = [row for ok, row in pool.imap_unordered(downloader, todo) if not ok]
            if not todo:
                break


class _PolicyDownloader:
    """img2dataset's Downloader, run with the URL policy's opener installed (picklable: img2dataset's
    multiprocessing distributor sends it to its own processes)."""

    def __init__(self, downloader: Any, policy: UrlPolicy, gate: HostGate) -> None:
        self.downloader = downloader
        self.policy = policy
        self.gate = gate  # pickled by key: the processes of the pool each keep one (curation.core.crawl)

    def __call__(self, row: Any) -> Any:
        with self.policy.installed(self.gate):
            return self.downloader(row)


class _HeaderCheckedResizer:
    """img2dataset's Resizer behind a pixel limit read from the image header: bombs are never decoded.

    With `screen` (a hash_blocklist stage's lists) it first matches the fetched bytes: img2dataset calls
    its resizer before its writer, and on an error message writes the sample's record without the image,
    so a matched image never reaches a tar, only the list's name reaches the manifest."""

    def __init__(self, resizer: Any, max_pixels: int, tag: str, screen: Any = None) -> None:
        self.resizer = resizer
        self.max_pixels = max_pixels
        self.tag = tag
        self.screen = screen

    def __call__(self, img_stream: io.BytesIO, blurring_bbox_list: Any = None) -> tuple:
        if self.screen is not None:
            match = self.screen.match_bytes(img_stream.getvalue())
            if match is not None:
                return None, None, None, None, None, f"{self.tag}blocklisted: {match.describe()}"
        try:
            image_size(img_stream.getvalue(), self.max_pixels)
        except ImageRefused as e:
            # An unreadable header is not decoded either: its pixel count is unknown.
            message = f"{self.tag}too_large: {e.detail}" if e.status == "too_large" else str(e)
            return None, None, None, None, None, message
        img_stream.seek(0)
        return self.resizer(img_stream, blurring_bbox_list)


def _tar_members(path: Path, ext: str) -> dict[str, bytes]:
    """Image bytes by sample key from one img2dataset tar (written by this stage: no size limit)."""
    samples = read_samples(str(path), read=lambda key, e: e == ext, max_member_bytes=2**63)
    return {s.key: s.members[ext] for s in samples if ext in s.members}
