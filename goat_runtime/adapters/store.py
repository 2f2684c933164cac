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

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from goat_runtime.adapters.format import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE
from goat_runtime.adapters.remote import (
    FETCHED,
    Backend,
    FetchError,
    HubBackend,
    RemoteFile,
    S3Backend,
    StoreConfig,
    StoreEvents,
)

__all__ = ["FetchError", "Location", "StoreConfig", "StoreEvents", "check_location", "is_url",
           "open_location", "within_url"]

logger = logging.getLogger(__name__)

SCHEMES = ("s3", "hf")
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
        return RemoteLocation(S3Backend(bucket, config), prefix, config)
    repo, revision, folder = _parse_hf(rest, checked)
    return RemoteLocation(HubBackend(repo, revision, config), folder, config)


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


class RemoteLocation(Location):
    remote = True

    def __init__(self, backend: Backend, key: str, config: StoreConfig,
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
