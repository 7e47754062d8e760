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
import http.server
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

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
        """Upload files as public-read ``<prefix>/<uuid>.dcm``, the uuid fixed by prefix and
        file name (IDC's object names are stable too); returns key -> path."""
        keys = {}
        for path in paths:
            key = f"{prefix}/{uuid.uuid5(uuid.NAMESPACE_URL, f'{prefix}/{Path(path).name}')}.dcm"
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
    log_path: Path | None = None  # the server's request log (werkzeug's, on stderr)

    def start(self, timeout_s: float = 30.0) -> None:
        server = Path(sys.executable).parent / "moto_server"
        log = self.log_path.open("a") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        if self.log_path:
            log.close()  # the child holds its own copy
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

    def object_gets(self) -> Counter[str]:
        """``bucket/key`` -> GET requests the server has answered so far (from its log)."""
        assert self.log_path is not None, "start the server with a log_path"
        return Counter(
            unquote(match.group(1))
            for match in GET_LINE.finditer(self.log_path.read_text(errors="replace"))
        )


# an object GET (not a listing) in werkzeug's request log, which may colour the request
GET_LINE = re.compile(r'"(?:\x1b\[[0-9;]*m)*GET /([^ ?"]+/[^ ?"]+) HTTP/1\.1')


@contextlib.contextmanager
def moto_process(log_path: Path | None = None) -> Iterator[MotoProcess]:
    """A `moto_server` subprocess on a free loopback port; killed afterwards. With
    ``log_path``, its request log goes there (:meth:`MotoProcess.object_gets`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    s3 = MotoProcess(url=url, client=s3_client(url), port=port, log_path=log_path)
    s3.start()
    try:
        yield s3
    finally:
        s3.kill()


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Lists the bucket like S3 (ListObjectsV2); each object GET then fails as ``mode``."""

    protocol_version = "HTTP/1.1"
    server: FaultyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in do_GET

    def reply(self, status: int, body: bytes = b"", content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def listing(self, bucket: str, prefix: str) -> bytes:
        keys = sorted(k for k in self.server.objects if k.startswith(prefix))
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>2024-01-01T00:00:00.000Z"
            f'</LastModified><ETag>"0"</ETag><Size>{len(self.server.objects[k])}</Size>'
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for k in keys
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns='
            f'"http://s3.amazonaws.com/doc/2006-03-01/"><Name>{bucket}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys)}</KeyCount>"
            f"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>{contents}"
            "</ListBucketResult>"
        ).encode()

    def do_GET(self) -> None:
        self.server.requests.append(self.requestline)
        url = urlsplit(self.path)
        bucket, _, key = url.path.lstrip("/").partition("/")
        if not key:  # HEAD bucket or ListObjectsV2
            prefix = parse_qs(url.query).get("prefix", [""])[0]
            return self.reply(200, b"" if self.command == "HEAD" else self.listing(bucket, prefix))
        body = self.server.objects.get(unquote(key))
        if body is None:
            return self.reply(404, b"<Error><Code>NoSuchKey</Code></Error>")
        if self.command == "GET" and self.server.mode == "slowdown":
            return self.reply(503, SLOWDOWN)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return None
        self.wfile.write(body[: len(body) // 2])  # then: stall, or reset the connection
        self.wfile.flush()
        if self.server.mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            for handle in (self.rfile, self.wfile, self.connection):
                handle.close()  # the last reference to the socket: RST now
        else:
            self.server.release.wait()
        return None

    do_HEAD = do_GET


SLOWDOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)
LINGER_RESET = struct.pack("ii", 1, 0)  # close with RST: the client sees "connection reset"


class FaultyServer(http.server.ThreadingHTTPServer):
    """A loopback S3 stand-in that lists ``objects`` and fails every object GET: ``hang``
    (sends half the body, then stalls), ``slowdown`` (HTTP 503 SlowDown) or ``reset``
    (sends half the body, then resets the connection). ``requests`` records each request
    line."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if self.mode != "reset":  # a reset connection fails the handler's last flush
            super().handle_error(request, client_address)

    def __init__(self, objects: dict[str, bytes], mode: str) -> None:
        super().__init__(("127.0.0.1", 0), FaultyHandler)
        self.objects, self.mode = objects, mode
        self.requests: list[str] = []
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def faulty_s3(objects: dict[str, bytes], mode: str) -> Iterator[FaultyServer]:
    """Serve ``objects`` (key -> bytes, in any bucket) from a :class:`FaultyServer`."""
    server = FaultyServer(objects, mode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
