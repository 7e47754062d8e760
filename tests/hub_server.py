"""A loopback Hugging Face hub serving model repos from memory, for the download tests.

It answers the requests ``huggingface_hub`` makes for ``model_info`` and
``snapshot_download``, as the hub does (headers and error codes included):

* ``GET /api/models/{repo}[/revision/{rev}][?blobs=true]``: commit, gated flag, siblings
  (with ``blobs``: size, git blob id, LFS sha256);
* ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing;
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag``
  (LFS sha256 or git blob id) and ``Content-Length`` (``Range`` supported);
* unknown repos answer 404 ``RepoNotFound``, unknown revisions ``RevisionNotFound``,
  missing files ``EntryNotFound``, and a gated repo's files 403 ``GatedRepo``.

Usage::

    with hub_server({"lab/sd": Repo.from_folder(pipeline_dir)}) as hub:
        ...  # HF_ENDPOINT=hub.url; hub.requests lists (method, path) of every request
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One model repo at one commit; `served` overrides the bytes sent for some files."""

    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    served: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, **kwargs) -> Repo:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        return cls(files=files, **kwargs)

    def entry(self, path: str) -> dict:
        """The hub's description of a file: size, git blob id and (LFS files) sha256."""
        data = self.files[path]
        info = {"size": len(data), "blobId": git_blob_id(data)}
        if path.endswith(LFS_SUFFIXES):
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256(path)}"
            info["blobId"] = git_blob_id(pointer.encode())
            info["lfs"] = {"sha256": self.sha256(path), "size": len(data), "pointerSize": 134}
        return info

    def tree_entry(self, path: str) -> dict:
        """The file as ``/api/models/{repo}/tree/{rev}`` lists it."""
        entry = self.entry(path)
        listed = {"type": "file", "path": path, "size": entry["size"], "oid": entry["blobId"]}
        if "lfs" in entry:
            lfs = entry["lfs"]
            listed["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": 134}
        return listed

    def sha256(self, path: str) -> str:
        return hashlib.sha256(self.files[path]).hexdigest()

    def etag(self, path: str) -> str:
        entry = self.entry(path)
        return entry["lfs"]["sha256"] if "lfs" in entry else entry["blobId"]


@dataclass
class Hub:
    url: str
    repos: dict[str, Repo]
    requests: list[tuple[str, str]]

    def downloads(self) -> list[str]:
        """Paths of the files sent (GET on /resolve/)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _error(self, status: int, code: str) -> None:
            payload = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

        def _json(self, value: object) -> None:
            payload = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _repo(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
            elif revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound")
                return None
            return repo

        def _serve(self, body: bool) -> None:
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            hub.requests.append((self.command, path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(parts[2:], query)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
            else:
                self._error(404, "EntryNotFound")

        def _api(self, parts: list[str], query: dict) -> None:
            repo_id, rest = "/".join(parts[:2]), parts[2:]
            revision = rest[1] if len(rest) >= 2 else "main"
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if rest[:1] == ["tree"]:
                self._json([repo.tree_entry(name) for name in sorted(repo.files)])
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = [
                {"rfilename": name, **(repo.entry(name) if blobs else {})}
                for name in sorted(repo.files)
            ]
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": siblings,
                }
            )

        def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if repo.gated:
                self._error(403, "GatedRepo")
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound")
                return
            data = repo.served.get(name, repo.files[name])
            start = 0
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and ranged[6:].split("-")[0]:
                start = int(ranged[6:].split("-")[0])
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{repo.etag(name)}"')
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if body:
                self.wfile.write(data[start:])

    return Handler


@contextlib.contextmanager
def hub_server(repos: dict[str, Repo]) -> Iterator[Hub]:
    """Serve `repos` on a free 127.0.0.1 port until the block ends."""
    hub = Hub(url="", repos=repos, requests=[])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
