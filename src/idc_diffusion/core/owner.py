"""One writer per output folder: a lock file naming the job that writes there.

Snakemake records the SLURM job id of an incomplete job but does not check it: after a
login-node crash, ``--rerun-incomplete`` may start a second download or training job while
the first still writes (and the newcomer's cleanup would delete what the first writes). A job
therefore takes ``<folder>/.owner.json`` first, holding its SLURM job id (``SLURM_JOB_ID``)
and its host and pid. A lock whose owner is alive (``squeue -j`` lists the job as not
finished; or, without a SLURM id, the pid runs on this host) stops the newcomer with
:class:`FolderBusy`; a stale one (job finished or unknown to SLURM, process gone) is taken
over. A lock from another host without a SLURM id cannot be checked and counts as alive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = ".owner.json"
# squeue states of a job that no longer runs anything (squeue -o %T)
FINISHED = frozenset(
    {
        "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
        "OUT_OF_MEMORY", "PREEMPTED", "SPECIAL_EXIT", "TIMEOUT",
    }
)  # fmt: skip


class FolderBusy(RuntimeError):
    """Another live job writes the output folder."""


def identity() -> dict[str, Any]:
    """This process as a lock owner: SLURM job id (or None), host and pid."""
    return {
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def slurm_job_alive(job_id: str) -> bool | None:
    """Whether SLURM lists the job as not finished; None when squeue cannot tell (not
    installed, controller unreachable)."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return False if "Invalid job id" in result.stderr else None
    states = set(result.stdout.split())
    return bool(states - FINISHED)


def owner_alive(owner: Mapping[str, Any], me: Mapping[str, Any]) -> bool:
    """Whether the lock's owner may still be writing (see the module docstring)."""
    job = owner.get("slurm_job_id")
    if job:
        if job == me.get("slurm_job_id"):
            return False  # this very job, restarted (requeued) by SLURM
        alive = slurm_job_alive(str(job))
        if alive is not None:
            return alive
    if owner.get("host") == me["host"]:
        pid = int(owner.get("pid", 0))
        return pid > 0 and pid != me["pid"] and pid_alive(pid)
    return True


def describe(owner: Mapping[str, Any]) -> str:
    """``SLURM job 123 (pid 77 on node1)``."""
    where = f"pid {owner.get('pid')} on {owner.get('host')}"
    job = owner.get("slurm_job_id")
    return f"SLURM job {job} ({where})" if job else where


def claim(path: Path, me: Mapping[str, Any]) -> bool:
    """Create the lock file with ``me`` in it, atomically (whole content or nothing);
    False when it exists."""
    tmp = path.with_name(f"{path.name}.{me['pid']}.tmp")
    tmp.write_text(json.dumps(me))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def take(folder: Path, me: Mapping[str, Any]) -> Path:
    """Create ``folder``'s lock for ``me``, taking over a stale one; its path. Raises
    :class:`FolderBusy` when a live job holds it, OSError when it cannot be written."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while not claim(path, me):
        try:
            owner = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # released meanwhile
        except (OSError, ValueError):
            owner = {}
        if owner and owner_alive(owner, me):
            raise FolderBusy(
                f"{folder} is being written by {describe(owner)} (lock {path}); wait for it "
                "or cancel it; delete the lock only if that job is gone"
            )
        log.warning("%s: taking over the stale lock of %s", folder, describe(owner))
        path.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def owned(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; raises :class:`FolderBusy` when a live job holds
    it. A folder where no lock can be written (read-only, full) is used without one: the job
    cannot write there either, and reports that itself. Two jobs taking over the same stale
    lock at the same instant is not guarded against (Snakemake starts one job per output)."""
    me = identity()
    try:
        path = take(Path(folder), me)
    except OSError as exc:
        log.warning("%s: no owner lock (%s)", folder, exc.strerror or exc)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()) == me:
                path.unlink()
