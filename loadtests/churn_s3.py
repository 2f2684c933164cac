"""The churn benchmark's S3 store: moto's S3 server in its own process on loopback (the server
mode tests/s3.py uses, so neither the load generator nor goat-serve shares its GIL), the
adapters uploaded there once, and the environment a client needs to reach it, as a deployment
reaches MinIO or Ceph."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loadtests.common import PYTHON, ServerProcess, free_port

BUCKET = "adapters"


@dataclass
class S3Store:
    server: ServerProcess
    prefix: str = "churn"

    @property
    def env(self) -> dict[str, str]:
        """What goat-serve (or any S3 client) needs in its environment to reach the store."""
        return {"AWS_ENDPOINT_URL": self.server.url, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def url(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def stop(self) -> None:
        self.server.stop()


def start_s3(folder: Path, names: Sequence[str], log_path: Path) -> S3Store:
    """Start moto's S3 server and upload `folder/<name>/*` to s3://adapters/churn/<name>/."""
    import s3fs

    port = free_port()
    server = ServerProcess("moto", [str(PYTHON), "-m", "moto.server", "-H", "127.0.0.1", "-p",
                                    str(port)], port, log_path)
    store = S3Store(server)
    server.start()
    try:
        server.wait_healthy(120, path="/")
        # No region_name: s3fs would send it as a LocationConstraint, which us-east-1 refuses.
        fs = s3fs.S3FileSystem(key="test", secret="test", skip_instance_cache=True,
                               endpoint_url=server.url)
        fs.mkdir(BUCKET)
        local = [p for name in names for p in sorted((folder / name).iterdir())]
        start = time.monotonic()
        # A few files at a time: one batched put reads every file into memory first.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: fs.put_file(
                str(p), f"{BUCKET}/{store.prefix}/{p.parent.name}/{p.name}"), local))
        size = sum(p.stat().st_size for p in local)
        print(f"uploaded {len(names)} adapters ({size / 1e9:.2f} GB) to {store.url} in "
              f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    except BaseException:
        server.stop()
        raise
    return store
