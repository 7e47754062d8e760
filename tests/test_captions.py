"""Caption fields, de-identification and template rendering."""

import pytest
from dicom_factory import prepare_settings

from idc_diffusion.core.captions import (
    age_band,
    body_part_text,
    caption_fields,
    modality_text,
    render_caption,
    sex_text,
    template_fields,
    validate_parts,
)

PARTS = prepare_settings()["caption"]["parts"]


def test_example_caption():
    fields = caption_fields(
        modality="CT", body_part="CHEST", sex="M", age="065Y", plane="axial", window="lung"
    )
    assert (
        render_caption(fields, PARTS)
        == "CT of the chest, axial slice, lung window, male, 60-69 years"
    )


def test_fallbacks_drop_unknown_parts():
    fields = caption_fields(modality="CR", body_part=None, sex="O", age=None, view_position="PA")
    assert render_caption(fields, PARTS) == "radiograph, PA view"
    fields = caption_fields(
        modality="MR", body_part="HEADNECK", sex="F", age="007M", plane="sagittal"
    )
    assert (
        render_caption(fields, PARTS) == "MR of the head and neck, sagittal slice, female, infant"
    )


@pytest.mark.parametrize(
    ("age", "band"),
    [
        ("065Y", "60-69 years"),
        ("060Y", "60-69 years"),
        ("009Y", "0-9 years"),
        ("000Y", None),
        ("089Y", "80-89 years"),
        ("095Y", "90 years or older"),
        ("003W", "infant"),
        ("010D", "infant"),
        ("011M", "infant"),
        ("030M", "child"),
        (None, None),
        ("", None),
        ("65", None),
        (float("nan"), None),
    ],
)
def test_age_band(age, band):
    assert age_band(age) == band


def test_value_maps():
    assert modality_text("DX") == "radiograph" and modality_text("CT") == "CT"
    assert modality_text(None) is None
    assert body_part_text("HEADNECK") == "head and neck"
    assert body_part_text("CHEST") == "chest"
    assert body_part_text("PELVIS") == "pelvis"
    assert body_part_text("ABDOMEN_PELVIS") == "abdomen and pelvis"
    assert body_part_text("12345") is None  # not plain words: never copied into a caption
    assert sex_text("M") == "male" and sex_text("f") == "female"
    assert sex_text("O") is None and sex_text(None) is None


@pytest.mark.parametrize("field", ["PatientID", "StudyDate", "SeriesInstanceUID", "PatientName"])
def test_disallowed_fields_raise_naming_the_field(field):
    with pytest.raises(ValueError, match=field):
        template_fields(f"{{modality}} of {{{field}}}")
    with pytest.raises(ValueError, match=field):
        validate_parts([["{modality}"], ["{sex}", f"{{{field}}}"]])


def test_attribute_access_and_format_specs_are_refused():
    with pytest.raises(ValueError, match=r"modality\.__class__"):
        template_fields("{modality.__class__}")
    with pytest.raises(ValueError, match="format specs"):
        template_fields("{modality!r}")


def test_custom_separator_and_literal_text():
    fields = caption_fields(modality="CT", body_part="LUNG", sex=None, age=None, plane="coronal")
    assert (
        render_caption(fields, [["a {modality} scan"], ["{plane}"]], " | ") == "a CT scan | coronal"
    )
