"""Adapter stores (goat_runtime/adapters/store.py): S3 against a real S3 server (moto's server
mode on loopback, tests/s3.py) and the Hub offline, against a cache folder laid out here."""

import shutil
from pathlib import Path

import pytest

from goat_runtime.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from goat_runtime.adapters.store import (
    FetchError,
    StoreConfig,
    check_location,
    open_location,
    within_url,
)
from tests.s3 import BUCKET, upload

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
ADAPTERS = FIXTURE / "adapters"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Events:
    def __init__(self) -> None:
        self.downloads: list[tuple[str, int]] = []
        self.failures: list[tuple[str, str]] = []

    def on_adapter_download(self, store: str, nbytes: int, seconds: float) -> None:
        self.downloads.append((store, nbytes))

    def on_adapter_download_failed(self, store: str, reason: str) -> None:
        self.failures.append((store, reason))


def _size(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE))


@pytest.fixture
def config(tmp_path: Path) -> StoreConfig:
    return StoreConfig(cache_dir=tmp_path / "cache", retries=2, events=Events())


def _cached_files(config: StoreConfig) -> list[Path]:
    assert config.cache_dir is not None
    return sorted(p for p in config.cache_dir.rglob("*") if p.is_file())


# ---- URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["s3://Bad_Bucket/x", "s3://ab", "s3://bucket/../etc",
                                  "hf://only-org", "hf://org/repo@bad rev", "hf://org/../x",
                                  "gs://bucket/prefix", "http://example.com/a"])
def test_malformed_locations_are_refused_naming_them(text: str) -> None:
    with pytest.raises(ValueError, match="adapter location"):
        check_location(text)


def test_locations_and_confinement(tmp_path: Path) -> None:
    assert check_location(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="does not exist"):
        check_location(tmp_path / "nope")
    assert check_location("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert within_url("s3://bucket/a/b", "s3://bucket/a")
    assert not within_url("s3://bucket/ab", "s3://bucket/a")  # a segment, not a string prefix
    assert not within_url("s3://other/a", "s3://bucket")
    assert within_url("hf://org/repo@v2/x", "hf://org/repo")  # every revision of the repo
    assert not within_url("hf://org/repo@v2/x", "hf://org/repo@v1")
    assert not within_url("hf://org/repo2", "hf://org/repo")


# ---- S3 ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_s3_lists_without_downloading_then_fetches_once(s3, config: StoreConfig) -> None:
    for name in ("goat0", "lora0"):
        upload(s3, ADAPTERS / name, f"team/{name}")
    s3.pipe(f"{BUCKET}/team/notes.txt", b"not an adapter")
    store = open_location(f"s3://{BUCKET}/team", config)
    assert store.remote and store.adapter_names() == ["goat0", "lora0"]
    assert store.child("goat0").has_adapter() and not store.child("nope").has_adapter()
    assert store.child("goat0").local() is None and _cached_files(config) == []

    path = store.child("goat0").fetch()
    assert _same_files(path, ADAPTERS / "goat0")
    assert store.child("goat0").local() == path
    assert config.events.downloads == [("s3", _size(ADAPTERS / "goat0"))]
    assert store.child("goat0").fetch() == path  # cached: listed, not downloaded again
    assert len(config.events.downloads) == 1
    assert {p.name for p in _cached_files(config)} == {CONFIG_FILE, WEIGHTS_FILE}


def test_s3_new_version_replaces_the_cached_one(s3, config: StoreConfig) -> None:
    upload(s3, ADAPTERS / "goat0", "a/x")
    location = open_location(f"s3://{BUCKET}/a/x", config)
    first = location.fetch()
    upload(s3, ADAPTERS / "goat1", "a/x")  # same name, other weights
    second = location.fetch()
    assert second != first and not first.exists()
    assert _same_files(second, ADAPTERS / "goat1")


@pytest.mark.slow
def test_s3_interrupted_download_leaves_nothing_and_is_retried(s3, config: StoreConfig,
                                                               monkeypatch) -> None:
    upload(s3, ADAPTERS / "goat0", "x")
    location = open_location(f"s3://{BUCKET}/x", config)
    fs = location.backend.fs
    real_get = fs.get_file
    calls: list[str] = []

    def cut_short(remote: str, local: str, *args, **kwargs) -> None:
        calls.append(remote)
        real_get(remote, local, *args, **kwargs)
        if remote.endswith(WEIGHTS_FILE) and len(calls) <= 2:  # the first attempt breaks
            with open(local, "r+b") as f:
                f.truncate(100)

    monkeypatch.setattr(fs, "get_file", cut_short)
    path = location.fetch()
    assert len(calls) == 4 and _same_files(path, ADAPTERS / "goat0")
    assert config.events.failures == [] and len(config.events.downloads) == 1
    assert [p.parent for p in _cached_files(config)] == [path, path]  # no temporary left


def test_s3_failing_download_is_counted_and_caches_nothing(s3, config: StoreConfig,
                                                          monkeypatch) -> None:
    upload(s3, ADAPTERS / "goat0", "x")
    location = open_location(f"s3://{BUCKET}/x", config)

    def broken(remote: str, local: str, *args, **kwargs) -> None:
        Path(local).write_bytes(b"partial")
        raise ConnectionError("connection reset")

    monkeypatch.setattr(location.backend.fs, "get_file", broken)
    with pytest.raises(FetchError, match="connection reset") as info:
        location.fetch()
    assert info.value.reason == "network"
    assert config.events.failures == [("s3", "network")] and _cached_files(config) == []
    assert location.local() is None


@pytest.mark.slow
def test_s3_refusals_download_nothing(s3, config: StoreConfig, monkeypatch) -> None:
    upload(s3, ADAPTERS / "goat0", "big")
    s3.put_file(str(ADAPTERS / "goat0" / CONFIG_FILE), f"{BUCKET}/pickled/{CONFIG_FILE}")
    s3.pipe(f"{BUCKET}/pickled/adapter_model.bin", b"\x80\x04 never unpickled")
    small = StoreConfig(cache_dir=config.cache_dir, max_adapter_bytes=10_000,
                        events=config.events)
    attempts: list[str] = []
    for url, reason, match in [(f"s3://{BUCKET}/big", "too_large", "over the limit"),
                               (f"s3://{BUCKET}/pickled", "pickle", "never downloaded"),
                               (f"s3://{BUCKET}/missing", "not_found", "no adapter here")]:
        location = open_location(url, small)
        monkeypatch.setattr(location.backend.fs, "get_file", attempts.append)
        with pytest.raises(FetchError, match=match) as info:
            location.fetch()
        assert info.value.reason == reason
    assert attempts == [] and _cached_files(config) == []
    assert [r for _, r in config.events.failures] == ["too_large", "pickle", "not_found"]


# ---- the Hub, offline ----------------------------------------------------------------------

@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub's cache layout for org/adapters: refs/main and the tag v1 name one
    commit, whose snapshot holds goat0 and lora0 (plus a README); HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--adapters"
    snapshot = repo / "snapshots" / COMMIT
    for name in ("goat0", "lora0"):
        shutil.copytree(ADAPTERS / name, snapshot / name)
    (snapshot / "README.md").write_text("adapters")
    (repo / "refs").mkdir(parents=True)
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_hub_repo_as_an_adapter_folder(hub_cache: Path, config: StoreConfig) -> None:
    store = open_location("hf://org/adapters", config)
    assert store.remote and store.adapter_names() == ["goat0", "lora0"]
    path = store.child("lora0").fetch()
    assert path == hub_cache / "lora0" and _same_files(path, ADAPTERS / "lora0")
    pinned = open_location(f"hf://org/adapters@{COMMIT}/goat0", config)
    assert pinned.has_adapter() and pinned.fetch() == hub_cache / "goat0"
    assert config.events.downloads == []  # offline: served from the Hub's cache


def test_hub_revisions_are_pinned(hub_cache: Path, config: StoreConfig) -> None:
    assert open_location("hf://org/adapters@v1/goat0", config).fetch() == hub_cache / "goat0"
    with pytest.raises(FetchError) as info:
        open_location("hf://org/adapters@v2/goat0", config).fetch()
    assert info.value.reason == "not_found"
    assert config.events.failures == [("hf", "not_found")]
