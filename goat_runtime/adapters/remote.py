"""Remote adapter stores' backends (goat_runtime/adapters/store.py uses them): S3 through
fsspec's s3fs and the Hugging Face Hub through huggingface_hub, each listing files without a
download and downloading an adapter's files into a local folder; plus the errors, events and
settings they share with store.py.
"""

import contextlib
import json
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from goat_runtime.adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterError

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


@dataclass(frozen=True)
class RemoteFile:
    size: int
    version: str  # ETag (S3) or blob id / commit (Hub): changes when the content does


class Backend(ABC):
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


def version(files: dict[str, RemoteFile]) -> str:
    text = "|".join(f"{k}:{f.size}:{f.version}" for k, f in sorted(files.items()))
    return sha256(text.encode()).hexdigest()[:16]


class S3Backend(Backend):
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
        final = home / version(files)
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


class HubBackend(Backend):
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
