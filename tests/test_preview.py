"""preview.png: overlays where the masks are, none where they are not, true aspect ratio."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unisegcli.outputs.preview import CT_WINDOW_HU, display_window, render_preview, write_preview


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: overlay colours (the image itself is drawn R = G = B)."""
    rgb = rgb.astype(int)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 8


def _ct(shape=(24, 24, 24)) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.normal(40, 30, size=shape).astype(np.float32)
    image[:, :, :2] = -1000.0  # some air, so the CT guess applies
    return image


def _crop(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return rgb[top:bottom, left:right]


def test_corner_structure_colours_only_its_corner(tmp_path: Path) -> None:
    image = _ct()
    mask = np.zeros(image.shape, bool)
    mask[10:14, 18:22, 18:22] = True  # anterior (high y), patient-right (high x) corner
    path = write_preview(image, {"organ": mask}, (1.0, 1.0, 1.0), tmp_path / "preview.png")
    preview = render_preview(image, {"organ": mask}, (1.0, 1.0, 1.0))
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb.shape[:2] == (preview.image.height, preview.image.width)
    axial = _coloured(_crop(rgb, preview.panels["axial"]))
    assert axial.any()
    rows, cols = np.nonzero(axial)
    h, w = axial.shape
    # Radiological display: anterior at the top, the patient's right on the left.
    assert rows.max() < h / 3 and cols.max() < w / 3
    # In pixels: y 18..21 of 24 -> display rows 2..5, same for x -> columns 2..5 (scaled).
    scale = h / 24
    assert rows.min() >= 2 * scale - 1 and rows.max() <= 6 * scale + 1
    assert preview.slices_zyx == (12, 20, 20)
    for view in ("coronal", "sagittal"):
        assert _coloured(_crop(rgb, preview.panels[view])).any()


def test_empty_masks_leave_no_colour_outside_the_legend(tmp_path: Path) -> None:
    image = _ct()
    masks = {"organ": np.zeros(image.shape, bool), "tumor": np.zeros(image.shape, bool)}
    preview = render_preview(image, masks, (1.0, 1.0, 1.0))
    rgb = np.asarray(preview.image.convert("RGB"))
    coloured = _coloured(rgb)
    legend_top = preview.legend[1]
    assert not coloured[:legend_top].any()
    assert coloured[legend_top:].any()  # the legend swatches are drawn, in colour
    assert preview.slices_zyx == (12, 12, 12)  # middle of the volume


def test_every_structure_gets_a_legend_colour() -> None:
    image = _ct()
    masks = {f"s{i}": np.zeros(image.shape, bool) for i in range(3)}
    masks["s1"][5:8, 5:8, 5:8] = True
    preview = render_preview(image, masks, (1.0, 1.0, 1.0))
    legend = np.asarray(preview.image.convert("RGB"))[preview.legend[1] : preview.legend[3]]
    found = {tuple(int(v) for v in px) for px in legend.reshape(-1, 3)}
    assert all(tuple(c) in found for c in preview.colors.values())


def test_anisotropic_spacing_keeps_physical_aspect() -> None:
    image = _ct((8, 24, 48))  # 8 slices of 3 mm, 24 rows of 1 mm, 48 columns of 0.5 mm
    preview = render_preview(image, {}, (3.0, 1.0, 0.5))
    for view in ("axial", "coronal", "sagittal"):
        left, top, right, bottom = preview.panels[view]
        assert (right - left) == pytest.approx(bottom - top, abs=1), view  # all 24 mm × 24 mm


def test_window_ct_and_mr() -> None:
    assert display_window(_ct()) == CT_WINDOW_HU
    mr = np.random.default_rng(1).uniform(0, 1000, (16, 16, 16)).astype(np.float32)
    low, high = display_window(mr)
    assert 0 <= low < 50 and 950 < high <= 1000
    assert display_window(mr, modality="CT") == CT_WINDOW_HU
    flat = np.zeros((4, 4, 4), np.float32)
    assert display_window(flat) == (0.0, 1.0)
