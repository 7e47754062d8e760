"""Geometry and LUT helpers against hand-computed values."""

import numpy as np
import pytest
from pydicom.dataset import Dataset

from idc_diffusion.core.captions import (
    caption_fields,
    caption_rng,
    clip_token_count,
    render_caption,
)
from idc_diffusion.prepare.geometry import (
    axis_fractions,
    center_crop,
    fit_square,
    fov_shape,
    is_localizer,
    pad_or_crop,
    resample_to_fov,
    third_of,
)
from idc_diffusion.prepare.windowing import (
    apply_lut,
    composite_to_uint8,
    lut_from_item,
    lut_to_uint8,
    pick,
    voi_windows,
)


def test_axis_fractions_and_thirds():
    fractions = axis_fractions(np.array([-100.0, -50.0, 0.0, 200.0]))
    assert fractions.tolist() == [0.0, 1 / 6, 1 / 3, 1.0]
    assert [third_of(f) for f in fractions] == ["lower", "lower", "middle", "upper"]
    assert np.isnan(axis_fractions(np.array([5.0, 5.0]))).all() and third_of(np.nan) is None


def test_fov_resampling_keeps_mm_scale():
    # 100 x 50 pixels of 2 mm: 200 x 100 mm; at 400 mm over 100 px (4 mm/px) -> 50 x 25 px
    assert fov_shape((100, 50), (2.0, 2.0), 400.0, 100) == (50, 25)
    image = np.full((100, 50), 200, np.uint8)
    out = resample_to_fov(image, (2.0, 2.0), 400.0, 100)
    assert out.shape == (100, 100)
    assert int((out > 0).sum()) == 50 * 25 and out[50, 50] == 200 and out[0, 0] == 0


def test_fit_square_honours_non_square_pixels():
    image = np.full((16, 32), 200, np.uint8)  # 16 rows of 1 mm x 32 columns of 0.25 mm
    tall = fit_square(image, 32, (1.0, 0.25))  # 16 mm x 8 mm: 32 x 16 px, centred
    assert (tall[:, :8] == 0).all() and (tall[:, 24:] == 0).all() and (tall[:, 8:24] == 200).all()
    wide = fit_square(image, 32)  # square pixels: 16 x 32 px
    assert (wide[:8] == 0).all() and (wide[24:] == 0).all() and (wide[8:24] == 200).all()
    ramp = np.arange(40 * 24, dtype=np.uint8).reshape(40, 24)
    assert np.array_equal(fit_square(ramp, 32, (0.7, 0.7)), fit_square(ramp, 32))


def test_crop_and_pad_are_centred():
    image = np.arange(36, dtype=np.uint8).reshape(6, 6)
    assert center_crop(image, 0.5).tolist() == [[7, 8, 9], [13, 14, 15], [19, 20, 21]]
    padded = pad_or_crop(np.ones((2, 2), np.uint8), 4)
    assert padded.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="center_crop"):
        center_crop(image, 0)


def test_localizer():
    assert is_localizer(["ORIGINAL", "PRIMARY", "LOCALIZER"]) and not is_localizer(["AXIAL"])


def test_luts_hand_computed():
    item = Dataset()
    item.LUTDescriptor = [4, 10, 12]  # 4 entries, first mapped value 10, 12 bits
    item.LUTData = [0, 1000, 2000, 4095]
    lut = lut_from_item(item)
    assert apply_lut(np.array([5, 10, 11, 12, 13, 99]), lut).tolist() == [
        0, 0, 1000, 2000, 4095, 4095,
    ]  # fmt: skip
    # 1000 / 4095 * 255 = 62.27 -> 62; 2000 -> 124.54 -> 125
    assert lut_to_uint8(np.array([10, 11, 12, 13]), lut).tolist() == [0, 62, 125, 255]
    signed = Dataset()
    signed.LUTDescriptor, signed.LUTData = [2, 65535, 16], [7, 9]  # first mapped = -1
    assert apply_lut(np.array([-1, 0]), lut_from_item(signed, signed_input=True)).tolist() == [7, 9]


def test_voi_window_choice_and_composite():
    windows = voi_windows("40\\400", ["400", "1500"])
    assert windows == [(40.0, 400.0), (400.0, 1500.0)]
    assert pick(windows, 1) == (1, (400.0, 1500.0)) and pick(windows, 5) == (1, (400.0, 1500.0))
    assert pick([], 0) is None
    rgb = composite_to_uint8(np.array([[-1000.0, 50.0]]), [(-600, 1500), (50, 350), (400, 1800)])
    # -1000 HU: lung 255*((-1000+600.5)/1499+0.5)=59.5->60 (halves to even: 59.5 -> 60), others 0
    assert rgb.shape == (1, 2, 3) and rgb[0, 0].tolist() == [60, 0, 0]
    # 50 HU: lung ((50+600.5)/1499+0.5)*255 = 238.2; mediastinum 127.9; bone 77.96
    assert rgb[0, 1].tolist() == [238, 128, 78]


def test_caption_new_fields_seeded_dropout_and_tokens():
    fields = caption_fields(
        modality="CT", body_part="CHEST", sex="F", age="063Y", plane="axial",
        contrast="OMNIPAQUE", position="upper", disease="Non-small Cell Lung Cancer, Other",
        site="Lung",
    )  # fmt: skip
    assert (fields["contrast"], fields["disease"], fields["site"]) == (
        "with contrast", "non-small cell lung cancer", "lung",
    )  # fmt: skip
    parts = [["{modality} of the {body_part}"], ["{contrast}"], ["{position} third"], ["{sex}"]]
    full = render_caption(fields, parts)
    assert full == "CT of the chest, with contrast, upper third, female"
    texts = {
        render_caption(fields, parts, rng=caption_rng(0, f"img{i}"), dropout=0.5) for i in range(40)
    }
    assert all(t.startswith("CT of the chest") for t in texts) and len(texts) > 4
    again = render_caption(fields, parts, rng=caption_rng(0, "img3"), dropout=0.5)
    assert again == render_caption(fields, parts, rng=caption_rng(0, "img3"), dropout=0.5)
    assert (
        clip_token_count(full) == 2 + 12
    )  # ct of the chest , with contrast , upper third , female
    assert clip_token_count("x " * 100) == 102
