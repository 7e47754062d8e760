"""Windowing against hand-computed values (formula in windowing.window_to_uint8)."""

import numpy as np
import pytest
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from idc_diffusion.prepare.windowing import (
    apply_modality_lut,
    first_value,
    invert_if_monochrome1,
    normalise_to_uint8,
    percentile_range,
    voi_window,
    window_to_uint8,
)


def test_lung_window_hand_values():
    hu = np.array([-2000, -1350, -1349, -600, 149, 150, 3000])
    # -600: ((-600 + 600.5) / 1499 + 0.5) * 255 = 127.585 -> 128
    assert window_to_uint8(hu, -600, 1500).tolist() == [0, 0, 0, 128, 255, 255, 255]


def test_mediastinum_window_hand_values():
    hu = np.array([-1000, -125, 0, 50, 224, 225])
    # 0: ((0 - 49.5) / 349 + 0.5) * 255 = 91.33 -> 91; 50: 127.865 -> 128
    assert window_to_uint8(hu, 50, 350).tolist() == [0, 0, 91, 128, 255, 255]


def test_window_is_monotonic_uint8_and_rejects_narrow_width():
    out = window_to_uint8(np.linspace(-2000, 2000, 4001), 40, 80)
    assert out.dtype == np.uint8
    assert np.all(np.diff(out.astype(int)) >= 0)
    with pytest.raises(ValueError, match="width"):
        window_to_uint8(np.zeros(3), 0, 0.5)


def test_modality_lut_slope_intercept():
    stored = np.array([0, 512, 1000], dtype=np.uint16)
    hu = apply_modality_lut(stored, slope=2, intercept=-1024)
    assert hu.dtype == np.float32
    assert hu.tolist() == [-1024.0, 0.0, 976.0]


def test_monochrome1_radiograph_window_and_inversion():
    stored = np.array([0, 2048, 4095], dtype=np.uint16)
    center = MultiValue(DSfloat, ["2048", "1000"])  # multi-valued: first value wins
    width = MultiValue(DSfloat, ["4096", "500"])
    window = voi_window(center, width)
    assert window == (2048.0, 4096.0)
    shown = invert_if_monochrome1(window_to_uint8(stored, *window), "MONOCHROME1")
    # 2048: ((2048 - 2047.5) / 4095 + 0.5) * 255 = 127.53 -> 128 -> inverted 127
    assert shown.tolist() == [255, 127, 0]  # brightest stored -> black, darkest -> white
    assert invert_if_monochrome1(np.array([0, 255], np.uint8), "MONOCHROME2").tolist() == [0, 255]


def test_first_value_and_voi_window_parsing():
    assert first_value("40\\400") == 40.0
    assert first_value([50.0, 60.0]) == 50.0
    assert first_value(None) is None and first_value([]) is None and first_value("x") is None
    assert voi_window(None, 400) is None
    assert voi_window(40, 0) is None


def test_percentile_normalisation():
    values = np.arange(101, dtype=np.float32)  # percentiles 1 and 99 are exactly 1 and 99
    low, high = percentile_range(values, 1.0, 99.0)
    assert (low, high) == (1.0, 99.0)
    out = normalise_to_uint8(values, low, high)
    assert out[[0, 1, 99, 100]].tolist() == [0, 0, 255, 255]
    assert out[50] == round((50 - 1) / 98 * 255)  # 127.5 -> 128 (half to even)
    assert normalise_to_uint8(values, 5, 5).max() == 0
    with pytest.raises(ValueError):
        percentile_range(values, 99, 1)
