"""Caption fields and template rendering (pure functions).

A caption is built from a fixed allow-list of de-identified, human-readable fields. The
configured ``parts`` are lists of alternative templates; the first alternative whose fields
are all known is used, a part with no usable alternative is dropped, and the rendered parts
are joined with ``separator``. PatientID, names, dates and UIDs are never caption fields:
a template that names any field outside :data:`ALLOWED_FIELDS` raises ``ValueError``.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# Every field a caption template may use, in the order records and metadata list them.
CAPTION_FIELDS: tuple[str, ...] = (
    "modality",
    "body_part",
    "plane",
    "view",
    "window",
    "sex",
    "age_band",
    "contrast",
    "position",
    "disease",
    "site",
)
ALLOWED_FIELDS: frozenset[str] = frozenset(CAPTION_FIELDS)
CLIP_MAX_TOKENS = 77  # CLIP text encoder context, including start and end tokens

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
VIEW_TEXT = {
    "PA": "PA",
    "AP": "AP",
    "LL": "lateral",
    "RL": "lateral",
    "LAT": "lateral",
    "CC": "craniocaudal",
    "MLO": "mediolateral oblique",
}
SEX_TEXT = {"M": "male", "F": "female"}
_WORDS = re.compile(r"^[a-z][a-z ]{0,39}$")
_TERM = re.compile(r"^[a-z][a-z \-/]{1,59}$")  # a disease or site term from the index
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
CLIP_CHARS_PER_TOKEN = 8  # longer words split into BPE pieces of a few characters
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
    contrast: str | None = None,
    position: str | None = None,
    disease: str | None = None,
    site: str | None = None,
) -> dict[str, str | None]:
    """All allowed caption fields from raw DICOM/index codes (None when unknown).

    `contrast` is ContrastBolusAgent (present -> "with contrast", else unknown: absence in
    the header does not prove a scan was unenhanced); `position` a third of the body axis
    ("upper"/"middle"/"lower"); `disease`/`site` the collection's cancer type and tumour
    location from IDC's collections index.
    """
    return {
        "modality": modality_text(modality),
        "body_part": body_part_text(body_part),
        "plane": plane or None,
        "view": view_text(view_position),
        "window": window or None,
        "sex": sex_text(sex),
        "age_band": age_band(age),
        "contrast": "with contrast" if _clean_code(contrast) else None,
        "position": position or None,
        "disease": index_term(disease),
        "site": index_term(site),
    }


def index_term(value: str | None) -> str | None:
    """The first term of an IDC collections-index list ('Lung Cancer, Non-Cancer' -> 'lung
    cancer'), lower-cased; None unless it is plain words (no codes, digits or names)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    first = str(value).split(",")[0].strip().lower()
    return first if _TERM.match(first) else None


def usable(template: str, fields: Mapping[str, Any]) -> bool:
    """True when every field the template names is known."""
    return all(fields.get(name) not in (None, "") for name in template_fields(template))


def render_part(
    alternatives: Iterable[str], fields: Mapping[str, Any], rng: np.random.Generator | None = None
) -> str | None:
    """One usable alternative rendered (the first, or a seeded random one with `rng`)."""
    candidates = [t for t in alternatives if usable(t, fields)]
    if not candidates:
        return None
    template = candidates[0] if rng is None else candidates[int(rng.integers(len(candidates)))]
    return template.format(**{name: fields[name] for name in template_fields(template)})


def render_caption(
    fields: Mapping[str, Any],
    parts: Sequence[Sequence[str]],
    separator: str = ", ",
    *,
    rng: np.random.Generator | None = None,
    dropout: float = 0.0,
    random_choice: bool = True,
) -> str:
    """Render and join every part that has a usable alternative.

    With `rng`, every part after the first is dropped with probability `dropout` (the first,
    normally the modality, always stays so no caption is empty) and, if `random_choice`,
    each part's alternative is drawn at random among the usable ones.
    """
    rendered = []
    chooser = rng if random_choice else None
    for number, part in enumerate(parts):
        if rng is not None and number > 0 and dropout > 0 and rng.random() < dropout:
            continue
        text = render_part(part, fields, chooser)
        if text:
            rendered.append(text)
    return separator.join(rendered)


def caption_rng(seed: int, key: str) -> np.random.Generator:
    """A generator fixed by the seed and an image's name, so reruns give the same caption."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def parts_for(modality: str | None, caption: Mapping[str, Any]) -> Sequence[Sequence[str]]:
    """The caption parts of a modality: ``modality_parts[MOD]`` when set, else ``parts``."""
    per_modality = caption.get("modality_parts") or {}
    return per_modality.get((modality or "").upper(), caption["parts"])


def clip_token_count(text: str) -> int:
    """Approximate CLIP token count of a caption, start and end tokens included.

    Follows the CLIP tokenizer's pre-split (lower-case; words, single digits, punctuation
    runs); each word counts one token per started CLIP_CHARS_PER_TOKEN characters, which
    matches BPE for common English words (one token) and over-counts rare long words. An
    estimate without loading a vocabulary; captions here are short and plain.
    """
    pieces = _CLIP_PIECES.findall(text.lower())
    words = sum(-(-len(p) // CLIP_CHARS_PER_TOKEN) if p.isalpha() else 1 for p in pieces)
    return words + 2


def _clean_code(value: Any) -> str | None:
    """Stripped upper-case string of a code, or None for missing/NaN/empty."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    text = str(value).strip().upper()
    return text or None
