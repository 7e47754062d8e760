"""Caption fields and template rendering (pure functions).

A caption is built from a fixed allow-list of de-identified, human-readable fields. The
configured ``parts`` are lists of alternative templates; the first alternative whose fields
are all known is used, a part with no usable alternative is dropped, and the rendered parts
are joined with ``separator``. PatientID, names, dates and UIDs are never caption fields:
a template that names any field outside :data:`ALLOWED_FIELDS` raises ``ValueError``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ALLOWED_FIELDS: frozenset[str] = frozenset(
    {"modality", "body_part", "plane", "view", "window", "sex", "age_band"}
)

MODALITY_TEXT = {
    "CT": "CT",
    "MR": "MR",
    "CR": "radiograph",
    "DX": "radiograph",
    "MG": "mammogram",
}
BODY_PART_TEXT = {
    "HEADNECK": "head and neck",
    "HEAD_NECK": "head and neck",
    "ABDOMENPELVIS": "abdomen and pelvis",
    "ABDOMEN_PELVIS": "abdomen and pelvis",
    "CHESTABDOMEN": "chest and abdomen",
    "CHEST_ABDOMEN": "chest and abdomen",
    "CHESTABDPELVIS": "chest, abdomen and pelvis",
    "CHEST_ABDOMEN_PELVIS": "chest, abdomen and pelvis",
    "CAP": "chest, abdomen and pelvis",
    "TSPINE": "thoracic spine",
    "LSPINE": "lumbar spine",
    "CSPINE": "cervical spine",
    "LSSPINE": "lumbosacral spine",
    "WHOLEBODY": "whole body",
    "EXTREMITY": "extremity",
    "LUNG": "lung",
}
VIEW_TEXT = {"PA": "PA", "AP": "AP", "LL": "lateral", "RL": "lateral", "LAT": "lateral"}
SEX_TEXT = {"M": "male", "F": "female"}
_WORDS = re.compile(r"^[a-z][a-z ]{0,39}$")
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")


def template_fields(template: str) -> list[str]:
    """Names of the fields a template refers to, in order; ValueError for a disallowed one."""
    fields = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in ALLOWED_FIELDS:
            allowed = ", ".join(sorted(ALLOWED_FIELDS))
            raise ValueError(
                f"caption template {template!r} uses field {name!r}; allowed: {allowed}"
            )
        if spec or conversion:
            raise ValueError(f"caption template {template!r}: no format specs or conversions")
        fields.append(name)
    return fields


def validate_parts(parts: Sequence[Sequence[str]]) -> None:
    """Check every alternative of every caption part (ValueError naming the bad field)."""
    for part in parts:
        if isinstance(part, str) or not part:
            raise ValueError(f"each caption part must be a non-empty list of templates: {part!r}")
        for template in part:
            template_fields(template)


def modality_text(code: str | None) -> str | None:
    """Human-readable modality: CT, MR, radiograph (CR/DX); other codes kept as they are."""
    code = _clean_code(code)
    if code is None:
        return None
    return MODALITY_TEXT.get(code, code if re.fullmatch(r"[A-Z]{2,4}", code) else None)


def body_part_text(code: str | None) -> str | None:
    """Human-readable body part: a small map, else the lowercased code if it is plain words."""
    code = _clean_code(code)
    if code is None:
        return None
    if code in BODY_PART_TEXT:
        return BODY_PART_TEXT[code]
    words = code.lower().replace("_", " ").strip()
    return words if _WORDS.match(words) else None


def view_text(view_position: str | None) -> str | None:
    """Radiograph view from ViewPosition: PA, AP or lateral; None otherwise."""
    code = _clean_code(view_position)
    if code is None:
        return None
    return VIEW_TEXT.get(code, "lateral" if code.startswith("LAT") else None)


def sex_text(code: str | None) -> str | None:
    """'male'/'female' for M/F; anything else (O, missing) is unknown."""
    return SEX_TEXT.get(_clean_code(code) or "")


def age_band(age: str | None) -> str | None:
    """Decade band of a DICOM AS age ('065Y' -> '60-69 years'; >= 90 -> '90 years or older').

    Ages in days or weeks, and under 12 months, are 'infant'; other ages in months 'child'.
    '000Y' is unknown: de-identification writes it in place of an age (IDC has thousands),
    while real infants' ages are given in days, weeks or months.
    """
    match = _AGE.match(_clean_code(age) or "")
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2)
    if number == 0 and unit == "Y":
        return None
    if unit in "DW" or (unit == "M" and number < 12):
        return "infant"
    if unit == "M":
        return "child"
    if number >= 90:
        return "90 years or older"
    low = number // 10 * 10
    return f"{low}-{low + 9} years"


def caption_fields(
    *,
    modality: str | None,
    body_part: str | None,
    sex: str | None,
    age: str | None,
    plane: str | None = None,
    view_position: str | None = None,
    window: str | None = None,
) -> dict[str, str | None]:
    """All allowed caption fields from raw DICOM/index codes (None when unknown)."""
    return {
        "modality": modality_text(modality),
        "body_part": body_part_text(body_part),
        "plane": plane or None,
        "view": view_text(view_position),
        "window": window or None,
        "sex": sex_text(sex),
        "age_band": age_band(age),
    }


def render_part(alternatives: Iterable[str], fields: Mapping[str, Any]) -> str | None:
    """The first alternative whose fields are all known, rendered; None if there is none."""
    for template in alternatives:
        names = template_fields(template)
        if all(fields.get(name) not in (None, "") for name in names):
            return template.format(**{name: fields[name] for name in names})
    return None


def render_caption(
    fields: Mapping[str, Any], parts: Sequence[Sequence[str]], separator: str = ", "
) -> str:
    """Render and join every part that has a usable alternative."""
    rendered = (render_part(part, fields) for part in parts)
    return separator.join(text for text in rendered if text)


def _clean_code(value: Any) -> str | None:
    """Stripped upper-case string of a code, or None for missing/NaN/empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().upper()
    return text or None
