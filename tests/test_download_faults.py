"""Download stage against servers that misbehave, and files that only look whole: a stalled
GET, HTTP 503 SlowDown, connection resets, unknown transfer syntaxes, bytes that differ from
what the source lists, bytes past the end of a data set."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from s3_server import faulty_s3, moto_s3
from test_download import BUCKET, MATRIX, by_uid, cohort_row, settings

from idc_diffusion.download import s5cmd
from idc_diffusion.download.fetch import S5CMD_DIR
from idc_diffusion.download.shard import download_shard
from idc_diffusion.download.staging import PARTIAL
from idc_diffusion.download.synthetic import write_synthetic_series
from idc_diffusion.download.verify import verify_series

ROW = cohort_row("31", "CT", 2)
GOOD = cohort_row("32", "CT", 2)
PRIVATE_SYNTAXES = [
    "1.2.840.113619.5.2",  # GE implicit VR big endian (private)
    "1.3.46.670589.33.1.4.1",  # Philips private
    "1.2.840.10008.1.2.4.110",  # JPEG XL lossless: newer than pydicom 3.0
]


def objects_of(row: dict, folder: Path) -> dict[str, bytes]:
    """The series' synthetic files as S3 objects ``<crdc_series_uuid>/<name>``."""
    paths = write_synthetic_series(row, folder / row["SeriesInstanceUID"], matrix=64)
    return {f"{row['crdc_series_uuid']}/{p.name}": p.read_bytes() for p in paths}


def run_faulty(tmp_path: Path, mode: str, **extra) -> tuple[dict, list[str]]:
    """One series against a :class:`FaultyServer` in ``mode``: (its report entry, the
    server's request lines)."""
    with faulty_s3(objects_of(ROW, tmp_path / "source"), mode) as server:
        options = settings(server.url, retries=1, retry_backoff_s=0.05, **extra)
        report = download_shard(
            pd.DataFrame([ROW]), 0, tmp_path / "shard-0", tmp_path / "r.json", options
        )
    return by_uid(report)[ROW["SeriesInstanceUID"]], server.requests


def object_gets(requests: list[str]) -> int:
    return sum(line.startswith(f"GET /{BUCKET}/") for line in requests)


def test_stalled_server_fails_the_series_as_stalled(tmp_path):
    entry, requests = run_faulty(tmp_path, "hang", stall_timeout_s=1, s5cmd_retry_count=0)
    assert entry["status"] == "missing"
    assert (
        entry["reason"] == "stalled: nothing landed for 1 s, in 2 attempts; no files (expected 2)"
    )
    assert object_gets(requests) >= 2  # each attempt got as far as a GET that never finished
    shard = tmp_path / "shard-0"
    log = (shard / S5CMD_DIR / "s5cmd.log").read_text()
    assert log.count("# stopped: nothing landed for 1 s") == 2  # both attempts kept
    leftovers = list((shard / PARTIAL / ROW["SeriesInstanceUID"]).glob("*"))
    assert all(not p.name.endswith(".dcm") for p in leftovers), leftovers  # no half file


def test_http_503_is_named_with_the_attempts(tmp_path):
    entry, requests = run_faulty(tmp_path, "slowdown", s5cmd_retry_count=1)
    # 2 attempts x (1 + 1 s5cmd retry) = 4 GETs per object
    gets = object_gets(requests)
    assert gets == 4 * ROW["instanceCount"], requests
    assert entry["status"] == "missing"
    assert entry["reason"] == "HTTP 503 SlowDown after 4 attempts; no files (expected 2)"
    log = (tmp_path / "shard-0" / S5CMD_DIR / "s5cmd.log").read_text()
    assert log.count("SlowDown") == 2 * ROW["instanceCount"]  # both attempts' errors kept


def test_connection_reset_is_named(tmp_path):
    entry, _ = run_faulty(tmp_path, "reset", s5cmd_retry_count=0)
    assert entry["status"] == "missing"
    assert entry["reason"].startswith("connection reset after 2 attempts; no files")


def test_error_causes():
    cause = s5cmd.error_cause
    assert cause("write /x/a.dcm: no space left on device") == "disk full"
    assert cause("SlowDown: Please reduce. status code: 503, request id: ") == "HTTP 503 SlowDown"
    assert cause("read tcp 1->2: read: connection reset by peer") == "connection reset"
    line = 'ERROR "cp s3://b/00000000-0000-4000-8000-000000000001/k.dcm /d/k.dcm": boom'
    assert s5cmd.error_source(line) == ("s3://b/00000000-0000-4000-8000-000000000001/k.dcm", "boom")


# ------------------------------------------------------------------ transfer syntaxes


def with_syntax(path: Path, syntax: str, out: Path) -> Path:
    """``path`` re-labelled with TransferSyntaxUID ``syntax`` (data set unchanged)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    pydicom.dcmwrite(out, ds, implicit_vr=False, little_endian=True, force_encoding=True)
    return out


@pytest.mark.parametrize("syntax", PRIVATE_SYNTAXES)
def test_unknown_transfer_syntax_is_corrupt_not_a_crash(tmp_path, syntax):
    folder = tmp_path / ROW["SeriesInstanceUID"]
    paths = write_synthetic_series(ROW, folder, matrix=MATRIX)
    with_syntax(paths[0], syntax, paths[0])
    check = verify_series(folder, ROW["SeriesInstanceUID"], ROW["instanceCount"])
    assert check.status == "corrupt"
    assert check.reason == (
        f"{paths[0].name}: TransferSyntaxUID {syntax} is not a transfer syntax pydicom knows "
        "(private or newer); its pixel data cannot be checked or decoded"
    )


def test_unknown_transfer_syntax_on_s3_keeps_the_shard_going(tmp_path):
    source = tmp_path / "source"
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for row in (ROW, GOOD):
            paths = write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=MATRIX)
            if row is ROW:
                with_syntax(paths[1], PRIVATE_SYNTAXES[0], paths[1])
            s3.upload_series(BUCKET, row["crdc_series_uuid"], paths)
        report = download_shard(
            pd.DataFrame([ROW, GOOD]), 0, tmp_path / "s", tmp_path / "r.json", settings(s3.url)
        )
    entries = by_uid(report)
    assert entries[GOOD["SeriesInstanceUID"]]["status"] == "ok"
    assert entries[ROW["SeriesInstanceUID"]]["status"] == "corrupt"
    assert "is not a transfer syntax pydicom knows" in entries[ROW["SeriesInstanceUID"]]["reason"]
    assert (tmp_path / "r.json").is_file()


# ------------------------------------------------------------------ intact bytes


def test_bytes_after_the_data_set_are_corrupt(tmp_path):
    """Bundled index (no checksums): a file longer than its own header says is corrupt, for
    native and for encapsulated pixel data."""
    for name in ("CT_small.dcm", "JPEG2000.dcm"):
        source = Path(get_testdata_file(name))
        uid = str(pydicom.dcmread(source, stop_before_pixels=True).SeriesInstanceUID)
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(source, folder / name)
        assert verify_series(folder, uid, 1).ok, name
        with (folder / name).open("ab") as handle:
            handle.write(b"\x01" * 64)
        check = verify_series(folder, uid, 1)
        assert check.status == "corrupt", name
        assert check.reason.startswith(f"{name}: "), check.reason
        assert "bytes after the end of its data set" in check.reason, check.reason


def listing(objects: dict[str, bytes]) -> str:
    """``instance_files`` as a BigQuery cohort carries it: name, size, MD5 per object."""
    return ";".join(
        f"{key.split('/')[1]} {len(body)} {hashlib.md5(body).hexdigest()}"
        for key, body in sorted(objects.items())
    )


def test_listed_sizes_and_hashes_catch_damage_the_header_cannot(tmp_path):
    """A BigQuery cohort carries instance_size and instance_hash: a flipped pixel byte or a
    zero-filled tail (same size, header intact) is corrupt; the good series is ok."""
    rows = [cohort_row(str(40 + i), "CT", 2) for i in range(3)]
    good, flipped, zeroed = rows
    served = {}
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for row in rows:
            paths = write_synthetic_series(row, tmp_path / "src" / row["SeriesInstanceUID"])
            objects = {
                f"{row['crdc_series_uuid']}/{uuid.uuid4()}.dcm": p.read_bytes() for p in paths
            }
            row["instance_files"] = listing(objects)
            key, body = sorted(objects.items())[0]
            if row is flipped:
                body = body[:-10] + bytes([body[-10] ^ 1]) + body[-9:]
            if row is zeroed:
                body = body[:-1000] + b"\0" * 1000
            served[row["SeriesInstanceUID"]] = key.split("/")[1]
            for k, b in {**objects, key: body}.items():
                s3.client.put_object(Bucket=BUCKET, Key=k, Body=b, ACL="public-read")
        report = download_shard(
            pd.DataFrame(rows), 0, tmp_path / "s", tmp_path / "r.json", settings(s3.url)
        )
    entries = by_uid(report)
    assert entries[good["SeriesInstanceUID"]]["status"] == "ok"
    for row in (flipped, zeroed):
        entry = entries[row["SeriesInstanceUID"]]
        assert entry["status"] == "corrupt"
        name = served[row["SeriesInstanceUID"]]
        assert entry["reason"].startswith(f"{name}: MD5 "), entry["reason"]
        assert "differs from the source's instance_hash" in entry["reason"]
    # without the listing the same damage passes the header checks: say so in the README
    folder = tmp_path / "s" / PARTIAL / flipped["SeriesInstanceUID"]
    assert verify_series(folder, flipped["SeriesInstanceUID"], 2).ok


def test_listed_names_missing_and_unknown(tmp_path):
    folder = tmp_path / ROW["SeriesInstanceUID"]
    paths = write_synthetic_series(ROW, folder, matrix=MATRIX)
    listed = {p.name: (p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest()) for p in paths}
    uid = ROW["SeriesInstanceUID"]
    assert verify_series(folder, uid, 2, listed=listed).ok
    size, md5 = listed[paths[0].name]
    check = verify_series(folder, uid, 2, listed={**listed, "gone.dcm": (size, md5)})
    assert (check.status, check.reason) == ("incomplete", "1 of 3 files missing (gone.dcm)")
    del listed[paths[1].name]
    check = verify_series(folder, uid, 2, listed=listed)
    assert check.status == "corrupt"
    assert check.reason == f"{paths[1].name}: not an object of this series in the source"
