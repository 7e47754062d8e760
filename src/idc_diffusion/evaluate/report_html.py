"""HTML building blocks of the report: escaping, numbers, tables, notes, images and sections.

CITATIONS.md is rendered as CommonMark (+ tables) by markdown-it-py with raw HTML disabled;
bare URLs and DOIs become links.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from typing import Any

from markdown_it import MarkdownIt


def esc(value: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape("" if value is None else str(value))


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,…`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img_tag(png: bytes | None, alt: str) -> str:
    """An <img> embedding the PNG, or a note when there is none."""
    if not png:
        return note(f"No figure: {alt}.")
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}">'


def note(text: str) -> str:
    """A highlighted note paragraph."""
    return f'<p class="note">{esc(text)}</p>'


def banner(text: str) -> str:
    """A red warning banner."""
    return f'<div class="banner">{esc(text)}</div>'


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits; None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A simple HTML table (cells escaped and formatted)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_URL = re.compile(r"(https?://[^\s<>\"')\]]+)")
_DOI = re.compile(r"(?<![/\w.])(doi:\s*)?(10\.\d{4,9}/[^\s<>\"')\]]+)")


def linkify(text: str) -> str:
    """Escape text, keep line breaks, make URLs and bare DOIs clickable."""
    out = []
    for line in text.splitlines():
        escaped = esc(line)
        if _URL.search(escaped):
            escaped = _URL.sub(lambda m: f'<a href="{m.group(1)}">{m.group(1)}</a>', escaped)
        else:
            escaped = _DOI.sub(
                lambda m: (
                    f'{m.group(1) or ""}<a href="https://doi.org/{m.group(2)}">{m.group(2)}</a>'
                ),
                escaped,
            )
        out.append(escaped)
    return "<br>\n".join(out)


_MARKDOWN = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def _safe_link(url: str) -> bool:
    """True for http(s), mailto and in-page links."""
    return url.startswith(("http://", "https://", "mailto:", "#"))


def markdown_html(text: str, heading_offset: int = 2) -> str:
    """CommonMark + tables as HTML: raw HTML escaped, bare URLs/DOIs linked, unsafe hrefs cut.

    Headings move ``heading_offset`` levels down (``#`` becomes ``<h3>`` inside a section).
    """
    tokens = _MARKDOWN.parse(text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(6, int(token.tag[1]) + heading_offset)}"
        for child in token.children or []:
            if child.type == "link_open" and not _safe_link(str(child.attrGet("href") or "")):
                child.attrSet("href", "#")
    rendered = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    return _link_bare(rendered)


_TEXT_SEGMENT = re.compile(r"(<a\b.*?</a>|<[^>]+>)", re.S)


def _link_bare(rendered: str) -> str:
    """Link bare URLs and DOIs in text outside tags and existing links."""
    parts = _TEXT_SEGMENT.split(rendered)
    for i, part in enumerate(parts):
        if part.startswith("<"):
            continue
        if _URL.search(part):
            parts[i] = _URL.sub(lambda m: f'<a href="{m.group(1)}">{m.group(1)}</a>', part)
        else:
            parts[i] = _DOI.sub(
                lambda m: (
                    f'{m.group(1) or ""}<a href="https://doi.org/{m.group(2)}">{m.group(2)}</a>'
                ),
                part,
            )
    return "".join(parts)


def section(section_id: str, title: str, body: str) -> str:
    """A <section> with ``section_id``, an <h2> title and ``body``."""
    return f'<section id="{section_id}">\n<h2>{esc(title)}</h2>\n{body}\n</section>'


def ci_text(interval: Sequence[float] | None) -> str | None:
    """An interval as "[low, high]", or None without one."""
    if not interval:
        return None
    return f"[{fmt(interval[0])}, {fmt(interval[1])}]"


def extractor_label(extractor: dict | None) -> str:
    """A feature extractor's name and the start of its weights' sha256."""
    if not extractor:
        return "—"
    sha = str(extractor.get("weights_sha256") or "")
    return f"{extractor.get('name')} (sha256 {sha[:16]}…)"
