"""The key file (server/tenants.py): the issue's YAML shape and the same in TOML, keys matched by
the SHA-256 of their secret, globs over model names, and a bad file refused whole with the line
at fault while the keys in force stay."""

import hashlib
import socket
import textwrap
from pathlib import Path

import pytest

from server.tenants import (
    ANONYMOUS_ID,
    KeyFileError,
    Keyring,
    Limits,
    parse_key_file,
)

REPO = Path(__file__).resolve().parents[2]
PASSWORD_SHA = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"  # "password"

ISSUE_YAML = """\
keys:
  - id: acme                      # what logs and metrics show
    sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8  # of the secret, hex
    models: [SmolLM2-135M-Instruct, "acme-*"]  # names and globs
    admin: false                  # may load and unload adapters
    limits: {requests_per_minute: 600, tokens_per_minute: 200000, concurrent_requests: 8}
"""

ISSUE_TOML = """\
[[keys]]
id = "acme"
sha256 = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
models = ["SmolLM2-135M-Instruct", "acme-*"]
admin = false
limits = {requests_per_minute = 600, tokens_per_minute = 200000, concurrent_requests = 8}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(("name", "text"), [("keys.yaml", ISSUE_YAML), ("keys.toml", ISSUE_TOML)])
def test_the_issues_shape(tmp_path: Path, name: str, text: str) -> None:
    table = parse_key_file(write(tmp_path, name, text))
    (key,) = table.keys
    assert key.id == "acme" and key.admin is False
    assert key.limits == Limits(600, 200000, 8)
    assert table.identify(b"password") is key
    assert table.identify(b"passwordx") is None and table.identify(b"") is None
    assert key.allows("SmolLM2-135M-Instruct") and key.allows("acme-support")
    for other in ("acme", "globex-acme-1", "SmolLM2-135M-Instruct2", "smollm2-135m-instruct"):
        assert not key.allows(other), other


def test_api_key_flags_are_full_access_keys(tmp_path: Path) -> None:
    ring = Keyring(("s1", "s2"), write(tmp_path, "k.yaml", ISSUE_YAML))
    ids = [k.id for k in ring.table.keys]
    assert ids == ["api-key-1", "api-key-2", "acme"]
    full = ring.table.identify(b"s2")
    assert full is not None and full.admin and full.allows("anything-at-all")
    assert full.limits == Limits()
    assert Keyring().table.open and Keyring().table.ids == [ANONYMOUS_ID]


SECOND = hashlib.sha256(b"other").hexdigest()


@pytest.mark.parametrize(("name", "text", "expected"), [
    # parser errors: the parser's own line
    ("k.yaml", "keys:\n  - id: a\n    models: [x\n", "line 4"),
    ("k.yaml", "keys:\n  - id: a\n   sha256: b\n", "line 3"),
    ("k.toml", "[[keys]]\nid = 'a'\nmodels = [\n", "line 4"),
    ("k.toml", "[[keys]]\nid = 'a'\nid = 'b'\n", "line 3"),
    # our validation: the line of the entry at fault
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n"
               "  - id: b\n    sha256: 123\n    models: [x]\n", "line 5: key 'b': 'sha256'"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n"
               f"  - id: a\n    sha256: {SECOND}\n    models: [x]\n", "line 5: the id 'a'"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n"
               f"  - id: b\n    sha256: {PASSWORD_SHA}\n    models: [x]\n", "same sha256"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    model: [x]\n",
     "line 2: unknown field 'model'"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: []\n", "'models'"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n"
               "    admin: 'yes'\n", "'admin' must be true or false"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n"
               "    limits: {requests_per_minute: 0}\n", "positive integer"),
    ("k.yaml", f"keys:\n  - id: a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n"
               "    limits: {rpm: 5}\n", "unknown limit 'rpm'"),
    ("k.yaml", f"keys:\n  - id: -a\n    sha256: {PASSWORD_SHA}\n    models: [x]\n", "'id'"),
    ("k.toml", f"[[keys]]\nid = 'a'\nsha256 = '{PASSWORD_SHA}'\nmodels = ['x']\n\n"
               "[[keys]]\nid = 'b'\nsha256 = 'zz'\nmodels = ['x']\n", "line 6: key 'b'"),
    ("k.yaml", "keys: []\n", "empty"),
    ("k.yaml", "- id: a\n", "a list 'keys'"),
    ("k.yaml", f"keys:\n  - {{id: a, sha256: {PASSWORD_SHA}, models: [x]}}\nextra: 1\n",
     "unknown top-level field 'extra'"),
    ("k.json", "{}", "must end in .yaml, .yml or .toml"),
])
def test_a_bad_file_names_the_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(KeyFileError) as info:
        parse_key_file(path)
    assert expected in str(info.value) and str(path) in str(info.value), str(info.value)


def test_reload_keeps_the_keys_in_force_when_the_new_file_is_bad(tmp_path: Path) -> None:
    path = write(tmp_path, "k.yaml", ISSUE_YAML)
    ring = Keyring(("full",), path)
    before = ring.table
    path.write_text("keys:\n  - id: [\n")
    with pytest.raises(KeyFileError, match="line"):
        ring.reload()
    assert ring.table is before and ring.table.identify(b"password") is not None
    path.write_text(f"keys:\n  - id: globex\n    sha256: {SECOND}\n    models: ['*']\n")
    ring.reload()
    assert ring.table.identify(b"password") is None
    globex = ring.table.identify(b"other")
    assert globex is not None and globex.id == "globex" and not globex.admin
    assert ring.table.identify(b"full") is not None  # --api-key keys survive reloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
