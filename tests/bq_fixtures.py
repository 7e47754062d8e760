"""bqemulator on loopback, seeded with instance rows expanded from real IDC index series.

The emulator's two quirks are handled here, not in the backend: it lower-cases column
aliases in query results (CaseRestoringClient maps them back to the index's spelling), and
it cannot load a dataframe into a new table (tables are created with an explicit schema and
filled with insert_rows_json).
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import requests
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery

from idc_diffusion.cohort.bigquery_backend import SERIES_COLUMNS

PROJECT = "test-project"
LAUNCHER = Path(__file__).with_name("bq_emulator.py")

DICOM_ALL_SCHEMA = [
    *(
        bigquery.SchemaField(name, "STRING")
        for name in (
            "collection_id",
            "analysis_result_id",
            "PatientID",
            "SeriesInstanceUID",
            "StudyInstanceUID",
            "SOPInstanceUID",
            "source_DOI",
            "PatientAge",
            "PatientSex",
            "StudyDescription",
            "Modality",
            "SOPClassUID",
            "Manufacturer",
            "ManufacturerModelName",
            "SeriesDescription",
            "SeriesNumber",
            "license_short_name",
            "aws_bucket",
            "crdc_series_uuid",
            "crdc_instance_uuid",
            "instance_hash",
            "series_aws_url",
        )
    ),
    bigquery.SchemaField("StudyDate", "DATE"),
    bigquery.SchemaField("SeriesDate", "DATE"),
    bigquery.SchemaField("instance_size", "INT64"),
]
CURATED_SCHEMA = [
    bigquery.SchemaField("SOPInstanceUID", "STRING"),
    bigquery.SchemaField("BodyPartExamined", "STRING"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def emulator(log_path: Path) -> Iterator[str]:
    """Start bqemulator on loopback; yield its REST endpoint; stop it afterwards."""
    rest, grpc = _free_port(), _free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, str(LAUNCHER), "start", "--rest-host", "127.0.0.1"),
                *("--rest-port", str(rest), "--grpc-port", str(grpc), "--project", PROJECT),
                *("--log-level", "warning"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{rest}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bqemulator exited: {log_path.read_text()[-2000:]}")
            try:
                requests.get(f"{endpoint}/bigquery/v2/projects/{PROJECT}/datasets", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=20)


class _Result:
    """A query result whose field names are restored to the index's spelling."""

    def __init__(self, result: Any, names: dict[str, str]) -> None:
        self._rows = list(result)
        self.schema = [
            bigquery.SchemaField(names.get(f.name, f.name), f.field_type) for f in result.schema
        ]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


class _Job:
    def __init__(self, job: Any, names: dict[str, str]) -> None:
        self._job, self._names = job, names

    def result(self) -> _Result:
        return _Result(self._job.result(), self._names)


class CaseRestoringClient(bigquery.Client):
    """bigquery.Client whose results carry the series column names in their real case."""

    NAMES: ClassVar[dict[str, str]] = {name.lower(): name for name, _ in SERIES_COLUMNS}

    def query(self, query: str, *args: Any, **kwargs: Any) -> _Job:  # type: ignore[override]
        return _Job(super().query(query, *args, **kwargs), self.NAMES)


def client(endpoint: str) -> CaseRestoringClient:
    return CaseRestoringClient(
        project=PROJECT,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=endpoint),
    )


def instance_rows(series: pd.DataFrame) -> tuple[list[dict], list[dict]]:
    """dicom_all and dicom_metadata_curated rows: instanceCount instances per series.

    Instance sizes are whole bytes summing to round(series_size_MB * 1e6).
    """
    dicom_all, curated = [], []
    for row in series.itertuples(index=False):
        n = int(row.instanceCount)
        total = round(float(row.series_size_MB) * 1_000_000)
        url = row.series_aws_url[:-1] if row.series_aws_url.endswith("*") else row.series_aws_url
        for i in range(n):
            sop = f"{row.SeriesInstanceUID}.{i + 1}"
            dicom_all.append(
                {
                    "collection_id": row.collection_id,
                    "analysis_result_id": row.analysis_result_id,
                    "PatientID": row.PatientID,
                    "SeriesInstanceUID": row.SeriesInstanceUID,
                    "StudyInstanceUID": row.StudyInstanceUID,
                    "SOPInstanceUID": sop,
                    "source_DOI": row.source_DOI,
                    "PatientAge": row.PatientAge,
                    "PatientSex": row.PatientSex,
                    "StudyDescription": row.StudyDescription,
                    "Modality": row.Modality,
                    "SOPClassUID": row.SOPClassUID,
                    "Manufacturer": row.Manufacturer,
                    "ManufacturerModelName": row.ManufacturerModelName,
                    "SeriesDescription": row.SeriesDescription,
                    "SeriesNumber": row.SeriesNumber,
                    "license_short_name": row.license_short_name,
                    "aws_bucket": row.aws_bucket,
                    "crdc_series_uuid": row.crdc_series_uuid,
                    "series_aws_url": url,
                    "StudyDate": row.StudyDate,
                    "SeriesDate": row.SeriesDate,
                    "instance_size": total // n + (1 if i < total % n else 0),
                    "crdc_instance_uuid": str(uuid.uuid5(uuid.NAMESPACE_OID, sop)),
                    "instance_hash": hashlib.md5(sop.encode()).hexdigest(),
                }
            )
            curated.append({"SOPInstanceUID": sop, "BodyPartExamined": row.BodyPartExamined})
    # missing values are NULL, not the string "nan"
    clean = [
        [{k: None if pd.isna(v) else v for k, v in r.items()} for r in t]
        for t in (dicom_all, curated)
    ]
    return clean[0], clean[1]


def seed(bq: bigquery.Client, dataset: str, series: pd.DataFrame) -> int:
    """Create `dataset` with dicom_all + dicom_metadata_curated; return the instance count."""
    bq.create_dataset(dataset, exists_ok=True)
    dicom_all, curated = instance_rows(series)
    for name, schema, rows in (
        ("dicom_all", DICOM_ALL_SCHEMA, dicom_all),
        ("dicom_metadata_curated", CURATED_SCHEMA, curated),
    ):
        table = bq.create_table(bigquery.Table(f"{dataset}.{name}", schema=schema))
        for start in range(0, len(rows), 500):
            errors = bq.insert_rows_json(table, rows[start : start + 500])
            assert not errors, errors
    return len(dicom_all)
