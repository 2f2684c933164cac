"""Where adapters come from: a local folder, an S3 prefix or a Hugging Face Hub repository.

A location is written as
- a local path: `/srv/adapters`;
- `s3://bucket/prefix`: any S3-compatible store (AWS, MinIO, Ceph) through fsspec's s3fs, with
  the usual variables (AWS_ENDPOINT_URL, AWS_REGION / AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...);
- `hf://org/repo[@revision][/folder]`: a Hugging Face Hub model repository at a branch, tag or
  commit (default `main`), through huggingface_hub (its cache, HF_HUB_CACHE, HF_TOKEN,
  HF_HUB_OFFLINE, HF_ENDPOINT).

A location used as an adapter folder holds one adapter folder per name (`<location>/<name>/`
with `adapter_config.json`); a location used as one adapter holds that file itself.

Remote adapters are listed without downloading them (one listing, refreshed in the background
after `list_ttl` seconds) and fetched on first use: only `adapter_config.json` and
`adapter_model.safetensors`, never a pickle; within a size limit; with timeouts and retries.
S3 adapters land in `<cache_dir>/s3/<bucket>/<key>/<version>`, written to a temporary folder,
checked (config JSON, safetensors header) and renamed into place, so a folder there is always a
whole adapter; a new version (other ETags) is a new folder. Hub adapters land in the Hub's own
cache, which writes each file to a temporary name and renames it (the adapter is checked the
same way before use). The adapter manager then loads the local folder like any other.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from goat_runtime.adapters.format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, AdapterError

logger = logging.getLogger(__name__)

SCHEMES = ("s3", "hf")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FETCHED = (CONFIG_FILE, WEIGHTS_FILE)  # the only files ever downloaded


class FetchError(AdapterError):
    """A remote adapter that could not be fetched; `reason` is a metric label: not_found,
    too_large, pickle, invalid, denied, timeout or network."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class StoreEvents(Protocol):
    """Download events for metrics (called from the downloading thread)."""

    def on_adapter_download(self, store: str, nbytes: int, seconds: float) -> None: ...

    def on_adapter_download_failed(self, store: str, reason: str) -> None: ...


@dataclass
class StoreConfig:
    cache_dir: Path | None = None  # S3 downloads; default $GOAT_CACHE_DIR/adapters
    max_adapter_bytes: int = 1 << 30  # an adapter's files together, checked before download
    timeout: float = 60.0  # seconds per network call (connect, read)
    retries: int = 3  # attempts per download after a timeout or a network error
    list_ttl: float = 30.0  # seconds a listing of remote adapters is served before a refresh
    events: StoreEvents | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cache_dir is None:
            from goat_runtime.default_model import goat_cache_root

            self.cache_dir = goat_cache_root() / "adapters"
        self.cache_dir = Path(self.cache_dir)
        if self.max_adapter_bytes < 1 or self.retries < 1 or self.timeout <= 0:
            raise ValueError("max_adapter_bytes, retries and timeout must be positive")


def is_url(text: str | Path) -> bool:
    return bool(_URL.match(str(text)))


def check_location(text: str | Path) -> Path | str:
    """A local folder that exists (a Path) or a well-formed s3:// or hf:// URL (a str, not yet
    contacted); ValueError naming what is wrong otherwise."""
    text = str(text)
    match = _URL.match(text)
    if match is None:
        path = Path(text)
        if not path.exists():
            raise ValueError(f"adapter folder {text!r} does not exist")
        if not path.is_dir():
            raise ValueError(f"adapter folder {text!r} is not a folder")
        return path
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "s3":
        _parse_s3(rest, text)
    elif scheme == "hf":
        _parse_hf(rest, text)
    else:
        raise ValueError(f"adapter location {text!r}: unsupported scheme {scheme}://; use a "
                         f"local folder, s3://bucket/prefix or hf://org/repo[@revision]")
    return f"{scheme}://{rest.strip('/')}"


def within_url(url: str, root: str) -> bool:
    """Whether the checked URL `url` lies inside the checked URL `root`, path segment by
    segment (a Hub root without a revision admits every revision of its repository)."""
    def split(text: str) -> tuple[str, list[str]]:
        scheme, rest = text.split("://", 1)
        return scheme, [p for p in rest.split("/") if p]

    (scheme, parts), (root_scheme, root_parts) = split(url), split(root)
    if scheme != root_scheme or len(parts) < len(root_parts):
        return False
    if scheme == "hf" and len(root_parts) >= 2 and "@" not in root_parts[1]:
        parts = [*parts[:1], parts[1].partition("@")[0], *parts[2:]]
    return parts[:len(root_parts)] == root_parts


def _segments(path: str, text: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    for part in parts:
        if not _SEGMENT.fullmatch(part):
            raise ValueError(f"adapter location {text!r}: invalid path segment {part!r}")
    return parts


def _parse_s3(rest: str, text: str) -> tuple[str, str]:
    bucket, _, prefix = rest.strip("/").partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"adapter location {text!r}: {bucket!r} is not an S3 bucket name")
    return bucket, "/".join(_segments(prefix, text))


def _parse_hf(rest: str, text: str) -> tuple[str, str, str]:
    parts = rest.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"adapter location {text!r}: expected hf://org/repo[@revision][/folder]")
    repo, _, revision = parts[1].partition("@")
    if revision and not _REVISION.fullmatch(revision):
        raise ValueError(f"adapter location {text!r}: invalid revision {revision!r}")
    org_repo = "/".join(_segments(f"{parts[0]}/{repo}", text))
    if org_repo.count("/") != 1:
        raise ValueError(f"adapter location {text!r}: expected hf://org/repo[@revision][/folder]")
    return org_repo, revision or "main", "/".join(_segments("/".join(parts[2:]), text))


def open_location(source: str | Path, config: StoreConfig) -> "Location":
    """The location `source` names (see check_location)."""
    checked = check_location(source)
    if isinstance(checked, Path):
        return LocalLocation(checked)
    scheme, rest = checked.split("://", 1)
    if scheme == "s3":
        bucket, prefix = _parse_s3(rest, checked)
        return RemoteLocation(_S3(bucket, config), prefix, config)
    repo, revision, folder = _parse_hf(rest, checked)
    return RemoteLocation(_Hub(repo, revision, config), folder, config)


class Location(ABC):
    """A folder of adapter folders, or one adapter's folder."""

    remote: bool
    url: str

    @abstractmethod
    def child(self, name: str) -> "Location": ...

    @abstractmethod
    def adapter_names(self) -> list[str]:
        """Names of the adapter folders directly inside (no download)."""

    @abstractmethod
    def has_adapter(self) -> bool:
        """Whether this folder holds an adapter_config.json (no download)."""

    @abstractmethod
    def local(self) -> Path | None:
        """A local folder holding this adapter without a download, if there is one."""

    @abstractmethod
    def fetch(self) -> Path:
        """A local folder holding this adapter, downloading it if needed (FetchError)."""



@dataclass(eq=False)
class LocalLocation(Location):
    path: Path
    remote = False

    @property
    def url(self) -> str:  # type: ignore[override]
        return str(self.path)

    def child(self, name: str) -> "LocalLocation":
        return LocalLocation(self.path / name)

    def adapter_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if (p / CONFIG_FILE).is_file())

    def has_adapter(self) -> bool:
        return (self.path / CONFIG_FILE).is_file()

    def local(self) -> Path:
        return self.path

    def fetch(self) -> Path:
        return self.path


@dataclass(frozen=True)
class RemoteFile:
    size: int
    version: str  # ETag (S3) or blob id / commit (Hub): changes when the content does


class _Backend(ABC):
    name: str  # metric label: "s3" or "hf"

    @abstractmethod
    def url(self, key: str) -> str: ...

    @abstractmethod
    def list(self, key: str) -> dict[str, RemoteFile]:
        """Files under `key`, by path relative to it (raises on network errors)."""

    @abstractmethod
    def download(self, key: str, files: dict[str, RemoteFile]) -> tuple[Path, bool]:
        """A local folder holding `files` of the adapter at `key`, and whether they were
        downloaded now (False: already cached); raises on errors."""

    @abstractmethod
    def cached(self, key: str) -> Path | None: ...


class RemoteLocation(Location):
    remote = True

    def __init__(self, backend: _Backend, key: str, config: StoreConfig,
                 parent: "RemoteLocation | None" = None):
        self.backend, self.key, self.config = backend, key.strip("/"), config
        self.url = backend.url(self.key)
        self._parent = parent
        self._lock = threading.Lock()
        self._files: dict[str, RemoteFile] | None = None
        self._listed_at = 0.0
        self._refreshing = False

    def child(self, name: str) -> "RemoteLocation":
        if not _SEGMENT.fullmatch(name):
            raise ValueError(f"invalid adapter name {name!r}")
        return RemoteLocation(self.backend, f"{self.key}/{name}".strip("/"), self.config, self)

    # ---- listing (no download) ----

    def listing(self) -> dict[str, RemoteFile]:
        """This location's files as last listed. The first call lists now (raising FetchError
        if that fails); later ones refresh in the background once the listing is older than
        list_ttl, serving the old one meanwhile (the event loop never waits on the network)."""
        if self._parent is not None:
            name = self.key.rsplit("/", 1)[-1]
            return {rel[len(name) + 1:]: f for rel, f in self._parent.listing().items()
                    if rel.startswith(name + "/")}
        with self._lock:
            files, stale = self._files, time.monotonic() - self._listed_at > self.config.list_ttl
            start = files is not None and stale and not self._refreshing
            if start:
                self._refreshing = True
        if files is None:
            return self._relist()
        if start:
            threading.Thread(target=self._refresh, daemon=True, name="adapter-list").start()
        return files

    def _relist(self) -> dict[str, RemoteFile]:
        try:
            files = self.backend.list(self.key)
        except Exception as exc:
            raise _classify(exc, f"cannot list {self.url}") from exc
        with self._lock:
            self._files, self._listed_at = files, time.monotonic()
        return files

    def _refresh(self) -> None:
        try:
            self._relist()
        except Exception as exc:  # keep serving the last listing
            logger.warning("%s", exc)
        finally:
            with self._lock:
                self._refreshing = False

    def adapter_names(self) -> list[str]:
        return sorted({rel.split("/")[0] for rel in self.listing()
                       if rel.count("/") == 1 and rel.endswith("/" + CONFIG_FILE)})

    def has_adapter(self) -> bool:
        return CONFIG_FILE in self.listing()

    def local(self) -> Path | None:
        return self.backend.cached(self.key)

    # ---- fetching ----

    def fetch(self) -> Path:
        events, start = self.config.events, time.monotonic()
        try:
            path, nbytes = self._fetch()
        except FetchError as exc:
            if events:
                events.on_adapter_download_failed(self.backend.name, exc.reason)
            raise
        if nbytes and events:
            events.on_adapter_download(self.backend.name, nbytes, time.monotonic() - start)
        return path

    def _fetch(self) -> tuple[Path, int]:
        """(local folder, bytes downloaded: 0 on a cache hit)."""
        try:  # a fresh listing: the current versions, not the adapter folder's last listing
            files = self.backend.list(self.key)
        except Exception as exc:
            error = _classify(exc, f"cannot list {self.url}")
            cached = self.backend.cached(self.key)
            if cached is not None and error.reason in ("timeout", "network"):
                logger.warning("%s; serving the cached copy %s", error, cached)
                return cached, 0
            raise error from exc
        if CONFIG_FILE not in files:
            raise FetchError(f"{self.url}: no adapter here (no {CONFIG_FILE})", "not_found")
        if WEIGHTS_FILE not in files:
            pickles = sorted(f for f in files if "/" not in f and f.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise FetchError(
                    f"{self.url}: only safetensors checkpoints are loaded; found the pickle "
                    f"file(s) {', '.join(pickles)}, which are never downloaded or unpickled. "
                    f"Convert to {WEIGHTS_FILE}.", "pickle")
            raise FetchError(f"{self.url}: missing {WEIGHTS_FILE}", "invalid")
        wanted = {f: files[f] for f in FETCHED}
        total = sum(f.size for f in wanted.values())
        if total > self.config.max_adapter_bytes:
            raise FetchError(f"{self.url}: {total} bytes, over the limit of "
                             f"{self.config.max_adapter_bytes} (--max-adapter-size)", "too_large")
        return self._download(wanted, total)

    def _download(self, files: dict[str, RemoteFile], total: int) -> tuple[Path, int]:
        error: FetchError | None = None
        for attempt in range(self.config.retries):
            if attempt:
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
            try:
                path, fresh = self.backend.download(self.key, files)
            except FetchError:
                raise
            except Exception as exc:
                error = _classify(exc, f"cannot download {self.url}")
                if error.reason not in ("timeout", "network"):
                    raise error from exc
                logger.warning("%s (attempt %d of %d)", error, attempt + 1, self.config.retries)
                continue
            return path, total if fresh else 0
        assert error is not None
        raise error


def _classify(exc: BaseException, what: str) -> FetchError:
    """A FetchError with the metric reason of a store or network exception."""
    if isinstance(exc, FetchError):
        return exc
    name = type(exc).__name__
    text = f"{what}: {name}: {exc}"
    if isinstance(exc, FileNotFoundError) or name in (
            "RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError",
            "LocalEntryNotFoundError", "NoSuchBucket", "NoSuchKey"):
        return FetchError(text, "not_found")
    if isinstance(exc, PermissionError) or name in ("GatedRepoError", "AccessDenied"):
        return FetchError(text, "denied")
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return FetchError(text, "timeout")
    return FetchError(text, "network")


def check_fetched(folder: Path, files: dict[str, RemoteFile]) -> None:
    """What a downloaded folder must pass before it counts as cached: every file at its listed
    size, a JSON object config and a readable safetensors header. (The adapter manager's loader
    then checks it all against the base model, as for a local folder.)"""
    from safetensors import safe_open

    for rel, info in files.items():
        size = (folder / rel).stat().st_size if (folder / rel).is_file() else -1
        if size != info.size:
            raise OSError(f"{rel}: {size} bytes downloaded, {info.size} listed (interrupted?)")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FetchError(f"{CONFIG_FILE}: invalid JSON: {exc}", "invalid") from None
    if not isinstance(config, dict):
        raise FetchError(f"{CONFIG_FILE}: expected a JSON object", "invalid")
    try:
        with safe_open(folder / WEIGHTS_FILE, framework="pt"):
            pass
    except Exception as exc:
        raise FetchError(f"{WEIGHTS_FILE}: not a readable safetensors file: {exc}",
                         "invalid") from None


def _version(files: dict[str, RemoteFile]) -> str:
    text = "|".join(f"{k}:{f.size}:{f.version}" for k, f in sorted(files.items()))
    return sha256(text.encode()).hexdigest()[:16]


class _S3(_Backend):
    name = "s3"

    def __init__(self, bucket: str, config: StoreConfig):
        self.bucket, self.config = bucket, config
        self._fs: Any = None
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import s3fs

            # Our own retries (with a cache check in between); botocore's only for throttling.
            self._fs = s3fs.S3FileSystem(config_kwargs={
                "connect_timeout": self.config.timeout, "read_timeout": self.config.timeout,
                "retries": {"max_attempts": 2, "mode": "standard"}}, skip_instance_cache=True)
        return self._fs

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}".rstrip("/")

    def list(self, key: str) -> dict[str, RemoteFile]:
        root = f"{self.bucket}/{key}".rstrip("/")
        self.fs.invalidate_cache(root)
        found = self.fs.find(root, detail=True)
        return {path[len(root) + 1:]: RemoteFile(int(info["size"]), str(info.get("ETag", "")))
                for path, info in found.items()
                if info.get("type") == "file" and path.startswith(root + "/")}

    def _home(self, key: str) -> Path:
        assert self.config.cache_dir is not None
        return self.config.cache_dir / "s3" / self.bucket / PurePosixPath(key)

    def cached(self, key: str) -> Path | None:
        home = self._home(key)
        versions = [p for p in home.iterdir() if not p.name.startswith(".")] \
            if home.is_dir() else []
        return max(versions, key=lambda p: p.stat().st_mtime) if versions else None

    def download(self, key: str, files: dict[str, RemoteFile]) -> tuple[Path, bool]:
        home = self._home(key)
        final = home / _version(files)
        with self._guard:
            lock = self._locks.setdefault(str(home), threading.Lock())
        with lock:  # one download per adapter folder, whatever asks for it
            if final.is_dir():
                return final, False
            home.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=home))
            try:
                for rel in files:
                    self.fs.get_file(f"{self.bucket}/{key}/{rel}", str(tmp / rel))
                check_fetched(tmp, files)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            for old in home.iterdir():  # earlier versions (their loads already read them)
                if old != final and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
            return final, True


class _Hub(_Backend):
    name = "hf"

    def __init__(self, repo: str, revision: str, config: StoreConfig):
        self.repo, self.revision, self.config = repo, revision, config

    def url(self, key: str) -> str:
        return f"hf://{self.repo}@{self.revision}/{key}".rstrip("/")

    @staticmethod
    def _offline() -> bool:
        from huggingface_hub import constants

        return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
            "1", "ON", "YES", "TRUE")

    @staticmethod
    def _cache_dir() -> str | None:
        return os.environ.get("HF_HUB_CACHE") or None  # None: huggingface_hub's default

    def _snapshot(self, **kwargs: Any) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(self.repo, revision=self.revision,
                                      cache_dir=self._cache_dir(), etag_timeout=self.config.timeout,
                                      local_files_only=self._offline(), **kwargs))

    def list(self, key: str) -> dict[str, RemoteFile]:
        if self._offline():  # what the cache holds for this revision
            root = self._snapshot()
            base = root / key if key else root
            return {p.relative_to(base).as_posix(): RemoteFile(p.stat().st_size, root.name)
                    for p in base.rglob("*") if p.is_file()} if base.is_dir() else {}
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        entries = HfApi().list_repo_tree(self.repo, path_in_repo=key or None,
                                         revision=self.revision, recursive=True)
        prefix = f"{key}/" if key else ""
        return {e.path[len(prefix):]: RemoteFile(e.size, e.blob_id) for e in entries
                if isinstance(e, RepoFile) and e.path.startswith(prefix)}

    def cached(self, key: str) -> Path | None:
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(self.repo, revision=self.revision,
                                          cache_dir=self._cache_dir(), local_files_only=True))
            folder = root / key if key else root
            if all((folder / f).is_file() for f in FETCHED):
                return folder
        return None

    def download(self, key: str, files: dict[str, RemoteFile]) -> tuple[Path, bool]:
        prefix = f"{key}/" if key else ""
        had = self.cached(key)
        root = self._snapshot(allow_patterns=[prefix + f for f in files])
        folder = root / key if key else root
        check_fetched(folder, files)
        return folder, had is None
