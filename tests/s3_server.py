"""A loopback S3 server (moto) standing in for IDC's public bucket in tests.

Usage::

    with moto_s3() as s3:          # in-process (threads); or
    with moto_process() as s3:     # a `moto_server` subprocess that tests can stop/restart
        s3.client.create_bucket(Bucket="idc-open-data")
        s3.upload_series("idc-open-data", crdc_series_uuid, paths)
        settings = {"source": "idc", "endpoint_url": s3.url, ...}
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MotoS3:
    """A running moto S3 endpoint and a boto3 client for it (dummy credentials)."""

    url: str
    client: Any

    def upload_series(self, bucket: str, prefix: str, paths: Iterable[Path]) -> dict[str, Path]:
        """Upload files as public-read ``<prefix>/<random uuid>.dcm``; returns key -> path."""
        keys = {}
        for path in paths:
            key = f"{prefix}/{uuid.uuid4()}.dcm"
            self.client.put_object(
                Bucket=bucket, Key=key, Body=Path(path).read_bytes(), ACL="public-read"
            )
            keys[key] = Path(path)
        return keys


def s3_client(url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """Start moto's threaded S3 server on a free loopback port; stop it afterwards."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        yield MotoS3(url=url, client=s3_client(url))
    finally:
        server.stop()


@dataclass
class MotoProcess(MotoS3):
    """moto's S3 server as a child process on a fixed loopback port: killable, restartable.

    moto keeps objects in memory, so a restarted server is empty; upload again.
    """

    port: int = 0
    proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        server = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise TimeoutError(f"moto_server did not listen on port {self.port} in {timeout_s} s")

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL), as a crashed or unreachable endpoint."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def moto_process() -> Iterator[MotoProcess]:
    """A `moto_server` subprocess on a free loopback port; killed afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    s3 = MotoProcess(url=url, client=s3_client(url), port=port)
    s3.start()
    try:
        yield s3
    finally:
        s3.kill()
