"""Stage 1, cohort: which IDC series to use, under which licenses, in which split and shard.

Reads the ``cohort`` section and the IDC series index (bundled ``idc-index-data`` through
DuckDB, or BigQuery). Writes ``results/cohort/cohort.parquet`` (index columns + ``stratum``,
``split``, ``shard``), ``CITATIONS.md``, ``summary.json`` and ``download_plan.json``.

Entry point: :func:`idc_diffusion.cohort.selection.run_cohort`. Strata become SQL in
``filter_sql`` (the same filters for ``idc_index`` and ``bigquery_backend``); ``splits``
assigns patients to splits and series to shards; ``citations`` and ``download_plan`` write
the license summary and the size estimate.
"""
