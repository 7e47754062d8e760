"""A loopback S3 server (moto) standing in for IDC's public bucket in tests.

Usage::

    with moto_s3() as s3:
        s3.client.create_bucket(Bucket="idc-open-data")
        s3.upload_series("idc-open-data", crdc_series_uuid, paths)
        settings = {"source": "idc", "endpoint_url": s3.url, ...}
"""

from __future__ import annotations

import contextlib
import socket
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


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """Start moto's threaded S3 server on a free loopback port; stop it afterwards."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    try:
        yield MotoS3(url=url, client=client)
    finally:
        server.stop()
