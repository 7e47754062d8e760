"""Stage 5, sample: batched, individually seeded images from the fine-tuned and base models.

Reads ``results/model/`` (and ``results/base_model/``), the test split's captions and the
``sample`` section. Writes ``results/samples/shard-{k}/*.png`` and
``results/samples/manifest.parquet`` (prompt, seed, scheduler, steps, guidance, model hash,
seconds), the DICOM export in ``results/samples/dicom/``, and the same for the base model in
``results/samples_base/``.

Entry points: :func:`idc_diffusion.sample.generate.sample_shard` and
:func:`idc_diffusion.sample.generate.merge_manifests`; ``prompts`` builds and checks the
prompt set, ``dicom_export`` writes Secondary Capture files.
"""
