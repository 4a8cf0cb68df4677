"""Model files a config names, checked before any work: readable, of the right format, offline.

Each function returns one line saying why the file would not load (None: it loads), so `curate
validate` reports every model file of a config with its key instead of a run crashing on it later.
Checkpoints are opened weights-only and memory-mapped (no pickle code runs, large files cost
milliseconds); nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# open_clip model JSONs are a few hundred bytes; a larger one is not a model config.
MAX_MODEL_JSON_BYTES = 1 << 20
# Keys of an open_clip text tower that name a Hugging Face model, which open_clip fetches from the Hub.
HF_TEXT_KEYS = ("hf_model_name", "hf_tokenizer_name")
# Tower specs (timm model names, open_clip pretrained tags) that resolve outside the files curate checks.
REMOTE_TOWER_PREFIXES = ("hf-hub:", "local-dir:")


def open_clip_config_problem(name: str | None) -> str | None:
    """Why an open_clip model name or JSON config path is refused (None: accepted).

    A JSON whose text tower names a Hugging Face model would make open_clip contact the Hub; curate
    promises nothing is downloaded, so it refuses such a config whatever HF_HUB_OFFLINE says.
    """
    if name is None or not name.endswith(".json"):
        return None
    path = Path(name)
    try:
        if path.stat().st_size > MAX_MODEL_JSON_BYTES:
            return f"model config {name} is larger than {MAX_MODEL_JSON_BYTES} bytes: not an open_clip JSON"
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        return f"model config file not found: {name}"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"cannot read model config {name}: {getattr(e, 'strerror', None) or e}"
    if not isinstance(cfg, dict) or not isinstance(cfg.get("vision_cfg"), dict):
        return f"{name} is not an open_clip model config (no vision_cfg)"
    if cfg["vision_cfg"].get("timm_model_pretrained"):
        return (
            f"{name}: vision_cfg.timm_model_pretrained makes timm fetch ImageNet weights from the Hub; curate "
            "downloads nothing (set it false; for EfficientNet-Lite0 use model.image_init: efficientnet_lite0)"
        )
    for tower in ("vision_cfg", "text_cfg"):
        for key, value in (cfg.get(tower) or {}).items() if isinstance(cfg.get(tower), dict) else ():
            # timm (image towers) and open_clip resolve `hf-hub:org/name` on the Hub and `local-dir:PATH`
            # through a folder's config and weights: neither is the local file curate checks and fingerprints.
            if isinstance(value, str) and value.strip().lower().startswith(REMOTE_TOWER_PREFIXES):
                return (
                    f"{name}: {tower}.{key} = {value!r} names a model timm/open_clip would resolve "
                    f"{'on the Hugging Face Hub' if value.strip().lower().startswith('hf-hub:') else 'from a folder'}; "
                    "curate loads only the model its config builds and the checkpoint it names"
                )
    text = cfg.get("text_cfg")
    named = [k for k in HF_TEXT_KEYS if isinstance(text, dict) and text.get(k)]
    if named:
        return (
            f"{name}: text_cfg.{named[0]} names a Hugging Face model, which open_clip would fetch from the "
            "Hub; curate downloads nothing (use a model with a built-in text tower)"
        )
    return None


def torch_weights_problem(path: str | Path) -> str | None:
    """Why `path` is not a torch checkpoint loadable weights-only (None: it is)."""
    from curation.models.checkpoints import torch_load

    p = Path(path)
    if not p.is_file():
        return f"checkpoint not found: {p} (nothing is downloaded)"
    try:
        torch_load(p)
    except Exception as e:
        return f"cannot read checkpoint {p}: {load_error_line(e)}"
    return None


def fasttext_model_problem(path: str | Path) -> str | None:
    """Why `path` is not a fastText model (.bin/.ftz) that loads (None: it loads)."""
    p = Path(path)
    if not p.is_file():
        return f"language model file not found: {p}"
    try:
        import fasttext  # fasttext-predict: inference only

        fasttext.load_model(str(p))
    except Exception as e:
        return f"cannot load fastText model {p}: {load_error_line(e)}"
    return None


def load_error_line(e: BaseException) -> str:
    """The error's first line, without torch's advice to load with weights_only=False (never take it)."""
    from curation.models.checkpoints import CheckpointError

    if isinstance(e, CheckpointError):
        return e.why
    text = str(e).strip()
    if text.startswith("Weights only load failed"):
        return "it holds objects other than tensors (refused: checkpoints are loaded weights-only)"
    return text.splitlines()[0] if text else type(e).__name__


class ModelFileError(ValueError):
    """A model file named by URL cannot be fetched (one line, safe to print: no credentials)."""


def model_cache_dir() -> Path:
    """Where model files named by URL are copied: $CURATE_CACHE_DIR/models, else ~/.cache/curate/models
    ($XDG_CACHE_HOME/curate/models). Bounded by `cache_limit()`, least recently used out (`bound_cache`)."""
    root = os.environ.get("CURATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "curate"
    )
    return Path(root) / "models"


def local_model_path(
    location: str, storage_options: Mapping[str, Any] | None = None, *, directory: bool = False
) -> str:
    """A local path holding the model file (`directory`: the folder of files) that `location` names.

    A local path is returned as is. A URL (s3://...) is copied once through the storage layer into
    `model_cache_dir()`, under a key made of the URL and each object's version (ETag, size), so a
    changed object is fetched again and an unchanged one costs one metadata request. Stages check,
    fingerprint (by content, like a local file) and load that copy. Raises ModelFileError.
    """
    from curation.core.storage import StorageError, is_url, open_store

    if not is_url(location):
        return location
    url = location.rstrip("/")
    try:
        if directory:
            store = open_store(url, storage_options)
            store.check()
            names = sorted(n for n in store.list("") if n)
            if not names:
                raise FileNotFoundError(url)
        else:
            parent, name = url.rsplit("/", 1)
            store = open_store(parent, storage_options)
            store.check()
            names = [name]
        infos = [store.info(n) for n in names]
    except FileNotFoundError:
        raise ModelFileError(f"model {'folder' if directory else 'file'} not found: {url}") from None
    except PermissionError:
        raise ModelFileError(
            f"access denied to {url}: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_PROFILE, or storage_options)"
        ) from None
    except StorageError as e:
        raise ModelFileError(f"cannot read model {url}: {e}") from None
    files = [(n, i) for n, i in zip(names, infos) if i.get("type") != "directory"]
    if not directory and not files:
        raise ModelFileError(f"model file not found: {url} (a folder, not a file)")
    versions = [
        [n, str(i.get("ETag") or i.get("LastModified") or i.get("mtime")), i.get("size")] for n, i in files
    ]
    key = hashlib.sha256(json.dumps([url, versions]).encode()).hexdigest()[:32]
    folder = model_cache_dir() / key
    wanted = [folder / n for n, _ in files]
    # The cache folder is untrusted (shared, edited, truncated, or planted in advance: its key is computable
    # from one HEAD): every use checks each copy against the object's size and ETag (or the hash recorded
    # when this cache fetched it), and a copy that differs is fetched again.
    bad = _cache_problem(folder, files)
    if bad is not None and (folder.exists() or folder.is_symlink()):
        _say(f"model cache: {bad}; fetching {url} again")
        if folder.is_symlink():
            folder.unlink()
        shutil.rmtree(folder, ignore_errors=True)
    if bad is not None:
        # Fetched beside the final folder and renamed into place whole, so a crash or a concurrent
        # worker never leaves a half-written model where another process would load it.
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=f".{key}-", dir=folder.parent, ignore_cleanup_errors=True
        ) as tmp:
            try:
                store.get_to_local([n for n, _ in files], Path(tmp))
            except (OSError, StorageError) as e:
                raise ModelFileError(
                    f"cannot read model {url}: {getattr(e, 'strerror', None) or e}"
                ) from None
            got = _cache_problem(Path(tmp), files, fetched=_hashes_path(folder))
            if got is not None:
                raise ModelFileError(f"cannot read model {url}: the copy does not match the object ({got})")
            with contextlib.suppress(OSError):  # another process put the same copy in place first
                os.rename(tmp, folder)
        bad = _cache_problem(folder, files)
        if bad is not None:
            raise ModelFileError(f"model cache {folder}: {bad} right after fetching {url}")
    with contextlib.suppress(OSError):
        os.utime(folder)  # last use, for the least-recently-used bound
    bound_cache(keep=folder)
    return str(folder if directory else wanted[0])


def _hashes_path(folder: Path) -> Path:
    """Beside a cache folder (never in it: a model folder holds only the model's files): the sha256 of
    each copy, recorded when this cache fetched it."""
    return folder.with_name(f".{folder.name}.sha256.json")


DEFAULT_CACHE_BYTES = 20 * 10**9  # CURATE_CACHE_MAX_BYTES: the model cache's bound (least recently used out)
# Part sizes multipart uploaders use (boto3/aws cli 8 MiB, s3fs 50 MiB, others): a multipart ETag
# ("md5-of-part-md5s-N") is checked against each size that gives N parts.
PART_SIZES = tuple(m << 20 for m in (5, 8, 10, 15, 16, 25, 32, 50, 64, 100, 128, 256, 512))


def _say(message: str) -> None:
    from curation.core.terminal import printable

    print(f"curate: {printable(message)}", file=sys.stderr, flush=True)


def _cache_problem(folder: Path, files: list[tuple[str, dict]], *, fetched: Path | None = None) -> str | None:
    """Why the copies in `folder` are not the objects `files` describes (None: they are). `fetched`: the
    folder was just filled from the store, and each copy's sha256 is recorded in that file for later
    checks (see `_hashes_path`)."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link, not a folder of this cache"
    hashes: dict[str, str] = {}
    if fetched is None:
        try:
            hashes = json.loads(_hashes_path(folder).read_text())
            if not isinstance(hashes, dict):
                hashes = {}
        except (OSError, ValueError):
            hashes = {}
    recorded = {}
    for name, info in files:
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"{path} is missing" if not path.exists() else f"{path} is not a regular file"
        size = path.stat().st_size
        if info.get("size") is not None and size != int(info["size"]):
            return f"{path} is {size:,} bytes, the object {int(info['size']):,}"
        md5, sha = _digests(path)
        etag = str(info.get("ETag") or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            if md5 != etag:
                return f"{path} does not match the object's ETag"
        elif re.fullmatch(r"[0-9a-f]{32}-\d+", etag):
            if not _multipart_etag_matches(path, size, etag):
                return f"{path} does not match the object's multipart ETag"
        elif fetched is None and hashes.get(name) != sha:
            # No content ETag (another store, or encryption): the hash this cache recorded when it fetched.
            return f"{path} does not match the hash recorded when it was fetched"
        recorded[name] = sha
    if fetched:
        fetched.write_text(json.dumps(recorded))
    return None


def _digests(path: Path) -> tuple[str, str]:
    """(md5 of the whole file, sha256), in one read."""
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _multipart_etag_matches(path: Path, size: int, etag: str) -> bool:
    digest, _, parts = etag.partition("-")
    n = int(parts)
    for part in PART_SIZES:
        if -(-size // part) != n:
            continue
        md5s = b""
        with open(path, "rb") as f:
            for _ in range(n):
                h, left = hashlib.md5(usedforsecurity=False), part
                while left and (chunk := f.read(min(left, 1 << 20))):
                    h.update(chunk)
                    left -= len(chunk)
                md5s += h.digest()
        if hashlib.md5(md5s, usedforsecurity=False).hexdigest() == digest:
            return True
    return False


def cache_limit() -> int:
    """The model cache's size bound in bytes: $CURATE_CACHE_MAX_BYTES (e.g. 5e9), else 20 GB."""
    text = os.environ.get("CURATE_CACHE_MAX_BYTES", "")
    try:
        return max(0, int(float(text))) if text else DEFAULT_CACHE_BYTES
    except ValueError:
        return DEFAULT_CACHE_BYTES


def bound_cache(keep: Path | None = None, limit: int | None = None) -> list[Path]:
    """Remove the least recently used model folders until the cache holds at most `limit` bytes
    (`cache_limit()`); `keep` (the folder in use) is never removed. Returns the folders removed."""
    limit = cache_limit() if limit is None else limit
    root = model_cache_dir()
    folders = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                size = sum(
                    f.stat(follow_symlinks=False).st_size
                    for f in os.scandir(entry.path)
                    if f.is_file(follow_symlinks=False)
                )
                folders.append((entry.stat(follow_symlinks=False).st_mtime, size, Path(entry.path)))
    total = sum(size for _, size, _ in folders)
    removed = []
    for _, size, folder in sorted(folders):
        if total <= limit:
            break
        if keep is not None and folder == keep:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        _hashes_path(folder).unlink(missing_ok=True)
        total -= size
        removed.append(folder)
    return removed
