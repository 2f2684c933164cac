"""A real S3 server for tests: moto's server mode on a free 127.0.0.1 port, reached through
s3fs with AWS_ENDPOINT_URL, as a deployment reaches MinIO or Ceph (no mocked client)."""

import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BUCKET = "adapters"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server, up for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point every S3 client made from now on at `endpoint` (through the environment, as a
    deployment would) and return an s3fs filesystem there with an empty bucket BUCKET."""
    import s3fs

    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An s3fs filesystem on the test server with an empty bucket BUCKET (see s3_bucket)."""
    return s3_bucket(s3_server, monkeypatch)


def upload(fs: Any, folder: Path, key: str) -> None:
    """Put the files of a local adapter folder under s3://BUCKET/key/."""
    for path in sorted(folder.iterdir()):
        fs.put_file(str(path), f"{BUCKET}/{key}/{path.name}")
