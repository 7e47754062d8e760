"""Stage 3, prepare: DICOM series → windowed 8-bit PNG slices with captions.

Reads ``results/dicom/shard-{k}/``, the cohort rows and the ``prepare`` section. Writes
``results/dataset/shard-{k}/images/*.png``, ``records.parquet`` and ``rejected.parquet``;
the ``dataset`` rule merges shards into ``results/dataset/{train,val,test}/`` (Hugging Face
*imagefolder*: ``metadata.jsonl`` + images) and ``results/dataset/rejected.parquet``.

Entry points: :func:`idc_diffusion.prepare.shard.prepare_shard` and
:func:`idc_diffusion.prepare.dataset.build_imagefolder`. ``series`` reads a series into a
sorted stack (``geometry`` for the planes), ``windowing`` maps stored values to 8 bits,
``imaging`` resizes and writes PNGs, captions come from :mod:`idc_diffusion.core.captions`
with ``collection_terms`` (a collection's disease and site).
"""
