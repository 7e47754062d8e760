"""Stage 6, evaluate: generated samples against the prepared dataset.

Reads both sample manifests, ``results/dataset/`` and the ``evaluate`` section. Writes
``results/eval/metrics.json``, ``results/eval/report.html`` (self-contained) and
``results/eval/figures/``.

Entry point: :func:`idc_diffusion.evaluate.evaluation.evaluate`, which runs the phases.
``inputs`` reads the non-image inputs (split metadata, training record, cohort summary);
``image_sets`` reads the real and generated images once; ``features`` extracts image features;
``metrics`` (FID/KID with intervals, ``prdc``, MS-SSIM diversity), ``adherence``, ``intensity``,
``subgroups``, ``matching`` and ``memorization`` compute the numbers; ``metrics_file`` assembles
metrics.json. ``report_context`` saves the figures and gathers the report's parts; ``report``
renders the document and the run sections, ``report_scores`` the score sections,
``report_html`` holds the HTML building blocks, ``report_figures`` the matplotlib figures and
``provenance`` the package versions and git commit.
"""
