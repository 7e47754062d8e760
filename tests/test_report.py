"""The HTML report: sections, banners, embedded images, escaping, no external assets."""

from __future__ import annotations

import re

import numpy as np
from eval_fixtures import CITATIONS, COHORT_SUMMARY

from idc_diffusion.evaluate.provenance import package_versions
from idc_diffusion.evaluate.report import SECTION_IDS, render_report
from idc_diffusion.evaluate.report_figures import confusion_png, image_rows_png, loss_curve_png
from idc_diffusion.evaluate.report_html import linkify, markdown_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


FID_KID = {
    "n_real": 40,
    "n_generated": 40,
    "fid": 12.5,
    "fid_bias_corrected": None,
    "fid_ci": None,
    "fid_interval_note": "no interval: too few images",
    "kid": 0.01,
    "kid_ci": [0.004, 0.016],
    "level": 0.95,
}
COMPARED = {
    "n_real": 40,
    "n_generated": 40,
    "captions": 1,
    "real_left_out": 3,
    "generated_left_out": 0,
    "per_caption": [{"caption": "CT", "real": 43, "generated": 40, "used": 40}],
}
PAIR = {"shift_y": 1, "shift_x": -2, "train_file": "train_0003.png", "flagged": True}
MEMORIZATION = {
    "summary": {
        "n_samples": 40,
        "n_flagged": 3,
        "threshold": 0.93,
        "quantile": 0.99,
        "n_null": 40,
        "max_shift": 2,
        "image_size": 64,
        "expected_heldout_flag_rate": 1 / 41,
    },
    "flagged": [
        {**PAIR, "sample_file": f"p0000_s{i}.png", "similarity": 1.0 - i / 100} for i in range(3)
    ],
    "shown": [{**PAIR, "sample_file": "p0000_s0.png", "similarity": 1.0}],
}


def _context(pixel_source: list[str], is_random: bool) -> dict:
    image = np.zeros((16, 16), np.uint8)
    return {
        "run_name": "test-run",
        "date": "2026-01-01",
        "idc_version": "v25",
        "pixel_source": pixel_source,
        "feature_extractor": {"name": "fx", "weights_sha256": "ab" * 32, "is_random": is_random},
        "cohort": COHORT_SUMMARY,
        "citations": CITATIONS,
        "data": {"train_images": 3, "unique_captions": 2, "top_captions": [("a caption", 2)]},
        "training": {
            "summary": {"heldout_loss_base": 0.2, "heldout_loss_final": 0.15},
            "loss_figure": loss_curve_png([{"step": i, "loss": 1 / i} for i in range(1, 30)]),
        },
        "samples": [{"prompt": "CT <chest>", "figure": image_rows_png([("gen", [image])])}],
        "metrics": {"fid_kid": FID_KID, "compared": COMPARED},
        "memorization": MEMORIZATION,
        "provenance": {"config": {"evaluate": {"top_pairs": 8}}, "packages": package_versions()},
    }


def test_every_section_and_self_contained() -> None:
    html = render_report(_context(["idc"], is_random=False))
    for section_id in SECTION_IDS:
        assert f'id="{section_id}"' in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<(link|script)\b", html, re.IGNORECASE)
    assert "url(http" not in html
    assert "SYNTHETIC" not in html and "not comparable" not in html
    assert "relative improvement" in html and "25.0%" in html
    assert "12.5" in html and "abababababababab" in html


def test_banners_for_synthetic_and_random_extractor() -> None:
    html = render_report(_context(["synthetic"], is_random=True))
    assert "SYNTHETIC PIXEL DATA" in html
    assert "numbers are not comparable to published FID" in html
    assert html.count('class="banner"') == 2


def test_citations_escaped_and_linked() -> None:
    html = render_report(_context(["idc"], is_random=False))
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert '<a href="https://doi.org/10.7937/TCIA.HMQ8-J677">' in html
    assert '<a href="https://doi.org/10.1148/rg.230180">' in html
    assert "CT &lt;chest&gt;" in html
    assert linkify("a\nb").count("<br>") == 1


def test_citations_markdown_rendered() -> None:
    html = render_report(_context(["idc"], is_random=False))
    citations = html.split('id="citations"')[1].split("</section>")[0]
    assert "<h3>Citations</h3>" in citations and "<h4>Licenses</h4>" in citations
    assert citations.count("<li>") == 3 and "<em>RadioGraphics</em>" in citations
    assert "<th>license</th>" in citations and "<td>CC BY 4.0</td>" in citations
    assert '<a href="https://portal.imaging.datacommons.cancer.gov">IDC portal</a>' in citations
    assert 'href="javascript' not in citations  # an unsafe link stays plain text
    assert "# Citations" not in citations and "|---|" not in citations
    assert markdown_html("# T", heading_offset=0) == "<h1>T</h1>\n"


def test_missing_parts_render_notes() -> None:
    html = render_report({"pixel_source": ["idc"]})
    for section_id in SECTION_IDS:
        assert f'id="{section_id}"' in html
    assert "No cohort summary.json found" in html
    assert "No held-out losses" in html


def test_figures_are_png() -> None:
    assert loss_curve_png([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])[:8] == PNG_MAGIC
    assert loss_curve_png([]) is None
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert image_rows_png([("a", [rgb, rgb]), ("b", [rgb])])[:8] == PNG_MAGIC


def _score(accuracy: float | None, n: int) -> dict:
    return {"accuracy": accuracy, "ci95": None if accuracy is None else [0.5, 1.0], "n": n}


def test_comparison_and_adherence_sections_show_both_models_with_n() -> None:
    fid = {"fid": 40.0, "kid": 0.02, "kid_ci": [0.01, 0.03], "n_real": 9, "n_generated": 6}
    confusion = [[3, 0], [1, 2]]
    modality = {
        "classes": ["CT", "MR"],
        "n_train": 20,
        "majority_rate": 0.6,
        "real_test": {**_score(1.0, 9), "confusion": [[5, 0], [0, 4]]},
        "fine_tuned": {**_score(0.8333, 6), "confusion": confusion},
        "base": {**_score(0.5, 6), "confusion": [[3, 0], [3, 0]]},
    }
    adherence = {"fields": ["modality"], "main_field": "modality"}
    adherence["by_field"] = {"modality": modality}
    metrics = {
        "fid_kid": fid,
        "base_model": {"fid_kid": {**fid, "fid": 300.0, "kid": 0.3, "kid_ci": [0.2, 0.4]}},
        "real_floor": {"fid": 20.0, "kid": 0.001, "kid_ci": [-0.002, 0.004], "n_real": 9,
                       "n_generated": 20},
        "adherence": adherence,
    }  # fmt: skip
    context = {**_context(["synthetic"], False), "metrics": metrics}
    context["adherence"] = {**adherence, "figure": confusion_png(adherence)}
    html = render_report(context)
    comparison = html.split('id="comparison"')[1].split("</section>")[0]
    assert "6 generated vs 9 real test" in comparison and "9 test vs 20 train" in comparison
    assert "0.3 [0.2, 0.4]" in comparison and "0.02 [0.01, 0.03]" in comparison
    assert "0.50 [0.5, 1] (n=6)" in comparison and "0.83 [0.5, 1] (n=6)" in comparison
    assert "KID is an unbiased estimate" in comparison
    section = html.split('id="adherence"')[1].split("</section>")[0]
    assert "real test (ceiling)" in section and "1.00 [0.5, 1] (n=9)" in section
    assert section.count("data:image/png;base64,") == 1
    assert confusion_png({"main_field": None, "by_field": {}}) is None
    empty = render_report({**_context(["synthetic"], False), "metrics": {}})
    assert "The base model was not sampled." in empty


def test_metrics_show_n_compared_sets_and_interval_notes() -> None:
    html = render_report(_context(["idc"], is_random=False))
    metrics = html.split('id="metrics"')[1].split("</section>")[0]
    assert (
        "40 generated vs 40 real test images" in metrics
        and "left out: 0 generated, 3 real" in metrics
    )
    assert "<td>[0.004, 0.016]</td>" in metrics and "no interval: too few images" in metrics
    assert "40 gen / 40 real" in metrics


def test_memorization_lists_every_flagged_sample_flag_first() -> None:
    html = render_report(_context(["idc"], is_random=False))
    memo = html.split('id="memorization"')[1].split("</section>")[0]
    assert "<b>3 of 40 samples flagged</b>" in memo
    header = re.search(r"<table><tr>(.*?)</tr>", memo).group(1)
    assert header.startswith("<th>flagged</th><th>similarity</th>")
    assert all(f"p0000_s{i}.png" in memo for i in range(3))
    assert "1 of 3 flagged samples shown" in memo
    assert "p0000_s0.png beside train_0003.png: similarity 1" in memo
