"""Tenant keys: who may call the server, which models each key may use, whether it may load and
unload adapters, and its limits.

A key file (`--api-keys-file`, YAML or TOML) lists the keys by the SHA-256 of their secret, so
the file never holds a secret:

    keys:
      - id: acme
        sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
        models: [SmolLM2-135M-Instruct, "acme-*"]
        admin: false
        limits: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent_requests: 8}

Each `--api-key` is one more key with full access (every model, admin, no limits). A file that
does not parse or validate is refused whole, with the line at fault; `Keyring.reload` keeps the
keys in force until a new file is good.
"""

import fnmatch
import hashlib
import hmac
import re
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# The identity of every request when the server has no keys at all (cannot collide: ids start
# with a letter or digit).
ANONYMOUS_ID = "_anonymous"
_LIMITS = ("requests_per_minute", "tokens_per_minute", "concurrent_requests")
_FIELDS = {"id", "sha256", "models", "admin", "limits"}


class KeyFileError(ValueError):
    """The key file cannot be used; the message names the file and the line at fault."""


@dataclass(frozen=True)
class Limits:
    """Per key; None: no limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


@dataclass(frozen=True)
class TenantKey:
    id: str  # what logs and metrics show, never the secret
    digest: bytes = field(repr=False)  # SHA-256 of the secret
    models: tuple[str, ...] = ("*",)  # names and glob patterns
    admin: bool = False
    limits: Limits = Limits()

    def allows(self, model: str) -> bool:
        """Whether `model` (the base's or an adapter's name) matches one of the key's patterns.
        Every pattern is tried, so the time taken does not depend on which one matches."""
        allowed = False
        for pattern in self.models:
            allowed |= fnmatch.fnmatchcase(model, pattern)
        return allowed


ANONYMOUS = TenantKey(ANONYMOUS_ID, b"", admin=True)


def digest(secret: str | bytes) -> bytes:
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).digest()


@dataclass(frozen=True)
class KeyTable:
    keys: tuple[TenantKey, ...] = ()

    @property
    def open(self) -> bool:
        """No keys: every request is ANONYMOUS, with full access."""
        return not self.keys

    def identify(self, secret: bytes) -> TenantKey | None:
        """The key whose hash is the presented secret's, compared in constant time against every
        key (no early exit), so timing tells nothing about which keys exist."""
        presented = digest(secret)
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest) and found is None:
                found = key
        return found

    @property
    def ids(self) -> list[str]:
        return [key.id for key in self.keys] or [ANONYMOUS_ID]


def full_access_keys(secrets: tuple[str, ...]) -> list[TenantKey]:
    """`--api-key` secrets as keys with every right: ids api-key-1, api-key-2, ..."""
    return [TenantKey(f"api-key-{i}", digest(s), admin=True) for i, s in enumerate(secrets, 1)]


# ---- the key file ---------------------------------------------------------------------------

def _entry_lines_yaml(text: str) -> list[int]:
    """The line (1-based) of each entry of `keys`, from the YAML node tree."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key_node, value in root.value:
        if key_node.value == "keys" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _entry_lines_toml(text: str) -> list[int]:
    """The line of each `[[keys]]` table (an inline array of tables: the line of `keys =`)."""
    lines = text.splitlines()
    tables = [i + 1 for i, line in enumerate(lines) if re.match(r"\s*\[\[\s*keys\s*\]\]", line)]
    if tables:
        return tables
    inline = next((i + 1 for i, line in enumerate(lines) if re.match(r"\s*keys\s*=", line)), 0)
    return [inline] * text.count("{") if inline else []


def _parse(path: Path, text: str) -> tuple[Any, list[int]]:
    """The file's data and the line of each key entry."""
    if path.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text), _entry_lines_toml(text)
        except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
            message = str(exc)  # ... or "(at end of document)": say which line that is
            message = message.replace("end of document",
                                      f"the end of the file, line {text.count(chr(10)) + 1}")
            raise KeyFileError(f"{path}: not valid TOML: {message}") from None
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise KeyFileError(f"{path}: a key file must end in .yaml, .yml or .toml")
    try:
        return yaml.safe_load(text), _entry_lines_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise KeyFileError(f"{path}: not valid YAML: {where}{problem}") from None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _key(entry: Any) -> TenantKey:
    """One entry of `keys`, checked field by field (ValueError names the field)."""
    if not isinstance(entry, dict):
        raise ValueError("each entry of 'keys' must be a mapping")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(_FIELDS))})")
    key_id = entry.get("id")
    if not isinstance(key_id, str) or not _ID.fullmatch(key_id):
        raise ValueError("'id' must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    sha = entry.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"key {key_id!r}: 'sha256' must be 64 hex digits (the SHA-256 of the "
                         "secret, e.g. from `printf %s SECRET | sha256sum`)")
    models = entry.get("models")
    if (not isinstance(models, list) or not models
            or not all(isinstance(m, str) and m for m in models)):
        raise ValueError(f"key {key_id!r}: 'models' must be a non-empty list of names and glob "
                         "patterns")
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise ValueError(f"key {key_id!r}: 'admin' must be true or false")
    limits = entry.get("limits") or {}
    if not isinstance(limits, dict):
        raise ValueError(f"key {key_id!r}: 'limits' must be a mapping")
    for name, value in limits.items():
        if name not in _LIMITS:
            raise ValueError(f"key {key_id!r}: unknown limit {name!r} (limits: "
                             f"{', '.join(_LIMITS)})")
        if not _positive_int(value):
            raise ValueError(f"key {key_id!r}: limit {name!r} must be a positive integer")
    return TenantKey(key_id, bytes.fromhex(sha), tuple(models), admin, Limits(**limits))


def parse_key_file(path: Path, extra: list[TenantKey] | None = None) -> KeyTable:
    """The keys of the file at `path`, after `extra` (the --api-key keys); KeyFileError naming
    the line at fault if anything is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the key file: {exc}") from None
    data, lines = _parse(path, text)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeyFileError(f"{path}: the file must hold a list 'keys' of key entries")
    if set(data) != {"keys"}:
        other = sorted(set(data) - {"keys"})[0]
        raise KeyFileError(f"{path}: unknown top-level field {other!r} (only 'keys')")
    if not data["keys"]:
        raise KeyFileError(f"{path}: 'keys' is empty: the server would be open to everyone")
    keys = list(extra or [])
    for i, entry in enumerate(data["keys"]):
        where = f"line {lines[i]}" if i < len(lines) else f"entry {i + 1}"
        try:
            key = _key(entry)
        except ValueError as exc:
            raise KeyFileError(f"{path}: {where}: {exc}") from None
        for other in keys:
            if other.id == key.id:
                raise KeyFileError(f"{path}: {where}: the id {key.id!r} is used twice")
            if other.digest == key.digest:
                raise KeyFileError(f"{path}: {where}: key {key.id!r} has the same sha256 as "
                                   f"{other.id!r}")
        keys.append(key)
    return KeyTable(tuple(keys))


class Keyring:
    """The keys in force: the --api-key keys plus the key file's, swapped whole on reload."""

    def __init__(self, secrets: tuple[str, ...] = (), path: Path | None = None):
        self.path = path
        self._extra = full_access_keys(secrets)
        self._lock = threading.Lock()
        self.table = self._read()  # KeyFileError at start-up: the server does not start

    def _read(self) -> KeyTable:
        if self.path is None:
            return KeyTable(tuple(self._extra))
        return parse_key_file(self.path, self._extra)

    def reload(self) -> KeyTable:
        """Re-read the key file; on KeyFileError the keys in force stay."""
        with self._lock:
            self.table = self._read()
            return self.table
