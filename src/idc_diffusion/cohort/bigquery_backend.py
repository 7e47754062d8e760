"""The cohort backend for IDC's BigQuery tables (`dicom_all` aggregated to series).

The series table is built in SQL the way idc-index-data builds its bundled parquet
(idc_index.sql): instance rows of `dicom_all` grouped by SeriesInstanceUID, ANY_VALUE for
the collection/patient/study/series attributes, BodyPartExamined from
`dicom_metadata_curated`, COUNT for instanceCount and SUM(instance_size)/1e6 for
series_size_MB. The cohort filters and ranking then run on it unchanged (cohort_spec).
One column the index lacks, ``instance_files`` (``<crdc_instance_uuid>.dcm <instance_size>
<instance_hash>`` per instance, ``;``-separated: the object names in the bucket with their
size and MD5), lets the download stage check every landed file's bytes.
Species comes from the bundled collections index (passed in as a list of collection ids),
so the same collections are excluded on both backends.

Credentials: Google's application-default credentials (`gcloud auth application-default
login`, or GOOGLE_APPLICATION_CREDENTIALS); never in config. Tests inject a client that
talks to bqemulator on loopback.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

# (output column, SQL expression over `dicom_all` / `dicom_curated`), in index order.
SERIES_COLUMNS: tuple[tuple[str, str], ...] = (
    ("collection_id", "ANY_VALUE(dicom_all.collection_id)"),
    ("analysis_result_id", "ANY_VALUE(dicom_all.analysis_result_id)"),
    ("PatientID", "ANY_VALUE(dicom_all.PatientID)"),
    ("SeriesInstanceUID", "dicom_all.SeriesInstanceUID"),
    ("StudyInstanceUID", "ANY_VALUE(dicom_all.StudyInstanceUID)"),
    ("source_DOI", "ANY_VALUE(dicom_all.source_DOI)"),
    ("PatientAge", "ANY_VALUE(NULLIF(dicom_all.PatientAge, ''))"),
    ("PatientSex", "ANY_VALUE(dicom_all.PatientSex)"),
    ("StudyDate", "ANY_VALUE(SAFE_CAST(dicom_all.StudyDate AS STRING))"),
    ("StudyDescription", "ANY_VALUE(dicom_all.StudyDescription)"),
    ("BodyPartExamined", "ANY_VALUE(dicom_curated.BodyPartExamined)"),
    ("Modality", "ANY_VALUE(dicom_all.Modality)"),
    ("SOPClassUID", "ANY_VALUE(dicom_all.SOPClassUID)"),
    ("Manufacturer", "ANY_VALUE(dicom_all.Manufacturer)"),
    ("ManufacturerModelName", "ANY_VALUE(dicom_all.ManufacturerModelName)"),
    ("SeriesDate", "ANY_VALUE(SAFE_CAST(dicom_all.SeriesDate AS STRING))"),
    ("SeriesDescription", "ANY_VALUE(NULLIF(dicom_all.SeriesDescription, ''))"),
    ("SeriesNumber", "ANY_VALUE(dicom_all.SeriesNumber)"),
    ("instanceCount", "COUNT(dicom_all.SOPInstanceUID)"),
    ("license_short_name", "ANY_VALUE(dicom_all.license_short_name)"),
    ("aws_bucket", "ANY_VALUE(dicom_all.aws_bucket)"),
    ("crdc_series_uuid", "ANY_VALUE(dicom_all.crdc_series_uuid)"),
    ("series_aws_url", "ANY_VALUE(CONCAT(dicom_all.series_aws_url, '*'))"),
    ("series_size_MB", "SUM(SAFE_CAST(dicom_all.instance_size AS FLOAT64)) / 1000000."),
    # BigQuery only (the bundled index has no per-file sizes or hashes): each object's name,
    # size and MD5, which download checks every landed file against
    (
        "instance_files",
        "STRING_AGG(CONCAT(dicom_all.crdc_instance_uuid, '.dcm ', "
        "CAST(dicom_all.instance_size AS STRING), ' ', dicom_all.instance_hash), ';' "
        "ORDER BY dicom_all.crdc_instance_uuid)",
    ),
)


def series_sql(dataset: str) -> str:
    """Series-level rows from `<dataset>.dicom_all` (+ curated body part), as the index has."""
    select = ",\n  ".join(f"{expr} AS {name}" for name, expr in SERIES_COLUMNS)
    return (
        f"SELECT\n  {select}\n"
        f"FROM `{dataset}.dicom_all` AS dicom_all\n"
        f"LEFT JOIN `{dataset}.dicom_metadata_curated` AS dicom_curated\n"
        "  ON dicom_all.SOPInstanceUID = dicom_curated.SOPInstanceUID\n"
        "GROUP BY dicom_all.SeriesInstanceUID"
    )


def default_client(project: str | None) -> Any:
    """A BigQuery client from application-default credentials (billing `project` or ADC's)."""
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import bigquery
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "cohort.backend: bigquery needs google-cloud-bigquery (pip install "
            "google-cloud-bigquery)"
        ) from exc
    try:
        credentials, adc_project = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"]
        )
    except DefaultCredentialsError as exc:
        raise ValueError(
            "cohort.backend: bigquery found no Google application-default credentials; run "
            "`gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS) "
            "— credentials never go in the config"
        ) from exc
    billing = project or adc_project
    if not billing:
        raise ValueError(
            "cohort.bigquery.project is null and the application-default credentials name no "
            "project; set cohort.bigquery.project to the Google Cloud project to bill"
        )
    return bigquery.Client(project=billing, credentials=credentials)


class BigQueryIndex:
    """The cohort backend on `<dataset>.dicom_all` (e.g. bigquery-public-data.idc_current)."""

    name = "bigquery"

    def __init__(self, dataset: str, project: str | None = None, client: Any = None) -> None:
        self.dataset = dataset
        self.client = client if client is not None else default_client(project)

    def source_sql(self) -> str:
        return series_sql(self.dataset)

    def columns(self) -> list[str]:
        return [name for name, _ in SERIES_COLUMNS]

    def query(self, sql: str) -> pd.DataFrame:
        result = self.client.query(sql).result()
        names = [field.name for field in result.schema]
        return pd.DataFrame([tuple(row.values()) for row in result], columns=names)

    def close(self) -> None:
        self.client.close()
