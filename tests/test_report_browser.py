"""The evaluation report in a real browser (headless Chromium), and Snakemake's own --report.

The browser test renders report.html of a small evaluated run, records in the DOM what every
<img> loaded (naturalWidth/Height) and which sections exist, and keeps a full-page screenshot
in ``test-artifacts/`` (gitignored). It skips only when no Chromium executable is installed
(Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, snakemake
from eval_fixtures import write_fake_run

from idc_diffusion.evaluate.report import SECTION_IDS

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
# Appended to a copy of the report (the report itself has no script): after load, writes what
# the browser saw into a <pre id="probe"> that --dump-dom prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({
    images: [...document.images].map((i) => ({
      alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight})),
    sections: [...document.querySelectorAll("section")].map((s) => s.id),
    citation_links: document.querySelectorAll("#citations a[href^='https://']").length,
    citation_tables: document.querySelectorAll("#citations table").length,
    title: document.title,
    viewport_width: document.documentElement.clientWidth,
    scroll_width: document.documentElement.scrollWidth,
    memorization_columns: [...document.querySelectorAll("#memorization table th")].map((th) => ({
      text: th.textContent, right: th.getBoundingClientRect().right})),
  });
  document.body.appendChild(probe);
});
</script>"""

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install -y chromium)"
)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile folder; fails the test on a non-zero exit."""
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    run = write_fake_run(tmp_path_factory.mktemp("browser"))
    settings = {
        "feature_extractor": {"kind": "random"},
        "kid_subset_size": 8,
        "bootstrap": 20,
        "prdc_k": 3,
        "min_group_size": 4,
    }
    run.evaluate(settings, run_name="browser")
    return run.out_dir / "report.html"


@needs_chromium
def test_every_image_loads_and_every_section_renders(report_html: Path, tmp_path: Path) -> None:
    text = report_html.read_text(encoding="utf-8")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    dom = chromium(
        tmp_path / "profile-dom",
        "--window-size=1024,4000",
        "--virtual-time-budget=15000",
        "--dump-dom",
        probe_page.as_uri(),
    ).stdout
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, "the probe script did not run (no <pre id='probe'> in the dumped DOM)"
    seen = json.loads(html.unescape(match.group(1)))
    assert seen["sections"] == list(SECTION_IDS)
    assert len(seen["images"]) == text.count("<img ") >= 6
    broken = [i["alt"] for i in seen["images"] if not (i["complete"] and i["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert all(i["height"] > 0 for i in seen["images"])
    assert seen["citation_links"] >= 2 and seen["citation_tables"] == 1
    assert seen["title"].startswith("IDC-Diffusion evaluation")
    # the memorization table's flagged column is on screen without scrolling sideways
    flagged = seen["memorization_columns"][0]
    assert flagged["text"] == "flagged" and flagged["right"] <= seen["viewport_width"]
    assert seen["scroll_width"] <= seen["viewport_width"]


@needs_chromium
def test_screenshot_kept_as_artifact(report_html: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(
        tmp_path / "profile-shot",
        "--window-size=1280,6000",
        "--virtual-time-budget=15000",
        f"--screenshot={shot}",
        report_html.as_uri(),
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # a page with figures
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "report-browser.png")
    shutil.copyfile(report_html, ARTIFACTS / "report.html")


@pytest.mark.workflow
def test_snakemake_report_of_a_finished_demo_run(demo_run: Path, tmp_path: Path) -> None:
    """`snakemake --report` of the finished demo run lists the evaluate outputs."""
    demo = str(REPO / "config" / "demo.yaml")
    out = tmp_path / "snakemake-report.html"
    result = snakemake(demo_run, "--configfile", demo, "--report", str(out))
    assert "Report created" in result.stdout + result.stderr
    page = out.read_text(encoding="utf-8", errors="replace")
    for name in ("metrics.json", "report.html", "loss_curve.png", "memorization_pairs.png"):
        assert name in page, f"{name} not registered in the Snakemake report"
