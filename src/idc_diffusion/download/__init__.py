"""Stage 2, download: one shard's series as verified DICOM files on disk.

Reads ``results/cohort/cohort.parquet`` (the shard's rows) and the ``download`` section.
Writes ``results/dicom/shard-{k}/<SeriesInstanceUID>/*.dcm`` and ``results/dicom/shard-{k}.json``
(the status of every series).

Entry point: :func:`idc_diffusion.download.shard.download_shard`. Bytes come from IDC's
buckets with ``s5cmd`` (``fetch`` runs the attempts), from a folder (``local_source``) or from
phantoms (``synthetic`` writes the DICOM files, ``phantom`` draws their pixels); ``verify``
checks each series (``dicom_header`` reads the fields it needs), ``staging`` moves verified
series from ``.partial`` into place, ``report`` writes the shard's status and ``expected`` reads
what a cohort row says to expect of a series (file count, listed objects, bytes).
"""
