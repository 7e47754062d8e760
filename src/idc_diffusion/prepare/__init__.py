"""Stage 3, prepare: DICOM series → windowed 8-bit PNG slices with captions.

Reads ``results/dicom/shard-{k}/``, the cohort rows and the ``prepare`` section. Writes
``results/dataset/shard-{k}/images/*.png``, ``records.parquet`` and ``rejected.parquet``;
the ``dataset`` rule merges shards into ``results/dataset/{train,val,test}/`` (Hugging Face
*imagefolder*: ``metadata.jsonl`` + images) and ``results/dataset/rejected.parquet``.

Entry points: :func:`idc_diffusion.prepare.shard.prepare_shard` and
:func:`idc_diffusion.prepare.dataset.build_imagefolder`. ``series`` reads a series into a
sorted stack: ``frames`` parses each file's header into frames, ``pixel_data`` checks pixel
data before decoding, ``slice_order`` keeps the consistent slices and sorts them,
``slice_header`` holds the types they share (``geometry`` for the planes).
``delivered`` reads which series the download delivered, ``slice_selection`` picks the
slices to render, ``display_windows`` their windows, ``windowing`` maps stored values to 8
bits, ``imaging`` resizes and writes PNGs, ``table_rows`` builds the rows of
``records.parquet`` and ``rejected.parquet``; captions come from
:mod:`idc_diffusion.core.captions` with ``collection_terms`` (a collection's disease and
site) and ``caption_stats`` summarises them.
"""
