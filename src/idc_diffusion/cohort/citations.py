"""CITATIONS.md and the license summary for a cohort, from IDC's collections index."""

from __future__ import annotations

import html
import re
from pathlib import Path

import duckdb
import pandas as pd

IDC_CITATION = (
    "Fedorov A, Longabaugh WJR, Pot D, et al. National Cancer Institute Imaging Data Commons: "
    "Toward Transparency, Reproducibility, and Scalability in Imaging Artificial Intelligence. "
    "RadioGraphics 2023;43(12):e230180. https://doi.org/10.1148/rg.230180"
)
TCIA_CITATION = (
    "Clark K, Vendt B, Smith K, et al. The Cancer Imaging Archive (TCIA): Maintaining and "
    "Operating a Public Information Repository. J Digit Imaging 2013;26(6):1045-1057. "
    "https://doi.org/10.1007/s10278-013-9622-7"
)
TCIA_DOI_PREFIX = "10.7937/"


def source_citations(collections_parquet: Path) -> pd.DataFrame:
    """One row per (collection, source DOI) with its citation text and license."""
    con = duckdb.connect()
    try:
        return con.execute(
            """
            SELECT collection_id, lower(s.source_doi) AS doi, s.citation AS citation,
                   s.license.license_short_name AS license, s.license.license_url AS license_url
            FROM (SELECT collection_id, unnest(sources) AS s FROM read_parquet(?))
            """,
            [str(collections_parquet)],
        ).df()
    finally:
        con.close()


def plain_citation(text: str | None) -> str:
    """Collections-index citations are HTML: unescape, italics to Markdown, one line."""
    if not text:
        return ""
    text = re.sub(r"</?i>", "*", html.unescape(text))
    return " ".join(text.split())


def license_counts(cohort: pd.DataFrame) -> dict[str, int]:
    """Series per license_short_name."""
    return {
        str(k): int(v) for k, v in cohort["license_short_name"].value_counts().sort_index().items()
    }


def citations_markdown(cohort: pd.DataFrame, sources: pd.DataFrame, idc_version: int) -> str:
    """What a user of this cohort must cite, and under which licenses the data come."""
    used = (
        cohort.assign(doi=cohort["source_DOI"].str.lower())
        .groupby(["collection_id", "doi", "license_short_name"], dropna=False)
        .size()
        .rename("series")
        .reset_index()
        .merge(
            sources[["collection_id", "doi", "citation", "license_url"]],
            how="left",
            on=["collection_id", "doi"],
        )
        .sort_values(["collection_id", "doi"])
    )
    lines = [
        "# Citations and licenses",
        "",
        f"This cohort was selected from NCI Imaging Data Commons release v{idc_version}. "
        "Cite IDC, every data source below, and TCIA where a source DOI is TCIA's (10.7937/...). "
        "Each source's license governs the images and any model trained on them.",
        "",
        "## Imaging Data Commons",
        "",
        f"- {IDC_CITATION}",
    ]
    if used["doi"].fillna("").str.startswith(TCIA_DOI_PREFIX).any():
        lines += ["", "## The Cancer Imaging Archive", "", f"- {TCIA_CITATION}"]
    lines += ["", "## Licenses", "", "| license | series |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in license_counts(cohort).items()]
    lines += [
        "",
        "## Data sources",
        "",
        "| collection | source DOI | license | series |",
        "|---|---|---|---|",
    ]
    for row in used.itertuples():
        lines.append(
            f"| {row.collection_id} | https://doi.org/{row.doi} "
            f"| {row.license_short_name} | {row.series} |"
        )
    lines += ["", "### Source citations", ""]
    for row in used.drop_duplicates("doi").itertuples():
        text = (
            plain_citation(row.citation)
            or f"(no citation text in the index) https://doi.org/{row.doi}"
        )
        lines.append(f"- {text}")
    return "\n".join(lines) + "\n"
