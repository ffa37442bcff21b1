"""A quick-look ``preview.png``: axial, coronal and sagittal slices with coloured mask overlays.

Slices pass through the centroid of all structures together (the middle of the volume when
every mask is empty). Panels are drawn in the radiological convention viewers use: axial
with anterior up and the patient's right on the image's left, coronal with superior up and
the patient's right on the left, sagittal with superior up and anterior on the left. Each
panel is resampled to one common mm-per-pixel scale, so anisotropic voxels (3 mm slices,
0.8 mm pixels) keep their true aspect ratio. CT is shown in a soft-tissue window
(W 400 / L 40 HU); other images in their 0.5-99.5 percentile range. The legend below the
panels lists each structure with its colour. Pillow only (no matplotlib), imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from unisegcli.io.atomic import staged_files

if TYPE_CHECKING:
    from PIL import Image

# Distinct, saturated colours (none grey, so overlay pixels are told apart from the image).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128),
)  # fmt: skip
OVERLAY_ALPHA = 0.45
CT_WINDOW_HU = (-160.0, 240.0)  # soft tissue: width 400, level 40
_MARGIN_PX = 8
_BACKGROUND = (0, 0, 0)
_TEXT = (255, 255, 255)


def structure_colors(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """RGB colour of each structure, by position (the palette repeats after 18 structures)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


@dataclass
class Preview:
    """A rendered preview: the RGB image and where its parts are (left, top, right, bottom) px."""

    image: "Image.Image"
    panels: dict[str, tuple[int, int, int, int]]
    legend: tuple[int, int, int, int]
    slices_zyx: tuple[int, int, int]
    window: tuple[float, float]
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)


def display_window(image_zyx: np.ndarray, modality: str | None = None) -> tuple[float, float]:
    """(low, high) display range: the CT soft-tissue window, or 0.5-99.5 percentiles otherwise.

    modality None guesses: CT if at least 1 % of the voxels are below -500 (air in HU), which
    MR and PET never are.
    """
    sample = np.asarray(image_zyx[::2, ::2, ::2], dtype=np.float32)  # percentiles of a subsample suffice
    is_ct = modality.upper().startswith("CT") if modality else float(np.percentile(sample, 1.0)) < -500.0
    if is_ct:
        return CT_WINDOW_HU
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def _centre_zyx(masks: Sequence[np.ndarray], shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Centroid (rounded voxel index) of the union of masks, or the volume's centre."""
    if not masks:
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    union = np.logical_or.reduce([np.asarray(m, dtype=bool) for m in masks])
    if not union.any():
        return tuple(s // 2 for s in shape)  # type: ignore[return-value]
    centre = []
    for axis in range(3):
        # Weighted mean of the per-slice voxel counts: no index arrays for large masks.
        counts = union.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        centre.append(int(round(float((counts * np.arange(shape[axis])).sum() / counts.sum()))))
    return tuple(centre)  # type: ignore[return-value]


def _views(volume: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The three display slices of a [Z, Y, X] volume, rows top-to-bottom, columns left-to-right."""
    z, y, x = centre
    return {
        "axial": volume[z, ::-1, ::-1],  # rows: anterior first; columns: patient right first
        "coronal": volume[::-1, y, ::-1],  # rows: superior first; columns: patient right first
        "sagittal": volume[::-1, ::-1, x],  # rows: superior first; columns: anterior first
    }


def render_preview(
    image_zyx: np.ndarray,
    masks_zyx: Mapping[str, np.ndarray],
    spacing_mm: Sequence[float],
    *,
    modality: str | None = None,
    panel_px: int = 256,
) -> Preview:
    """Draw the preview in memory.

    image_zyx: [Z, Y, X] (or [C, Z, Y, X]: the first channel is shown) original intensities.
    masks_zyx: structure -> bool [Z, Y, X], same grid. spacing_mm: (z, y, x). panel_px: the
    longest physical extent of the volume is drawn this many pixels long.
    """
    from PIL import Image, ImageDraw, ImageFont

    volume = np.asarray(image_zyx)
    if volume.ndim == 4:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(f"image must be [Z, Y, X] or [C, Z, Y, X], got shape {volume.shape}")
    sz, sy, sx = (float(s) for s in spacing_mm)
    names = list(masks_zyx)
    colors = structure_colors(names)
    low, high = display_window(volume, modality)
    centre = _centre_zyx([masks_zyx[n] for n in names], volume.shape)  # type: ignore[arg-type]
    gray_views = _views(volume, centre)
    mask_views = {n: _views(np.asarray(masks_zyx[n], dtype=bool), centre) for n in names}
    pixel_mm = {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}  # (row, column)
    mm_per_px = max(s * n for s, n in zip((sz, sy, sx), volume.shape)) / panel_px

    panels: dict[str, Image.Image] = {}
    for view, gray in gray_views.items():
        row_mm, col_mm = pixel_mm[view]
        size = (max(1, round(gray.shape[1] * col_mm / mm_per_px)), max(1, round(gray.shape[0] * row_mm / mm_per_px)))
        scaled = np.clip((gray.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0
        base = Image.fromarray(scaled.astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
        rgb = np.repeat(np.asarray(base, dtype=np.float32)[..., None], 3, axis=-1)
        for name in names:
            # Nearest neighbour keeps mask edges on voxel borders (no blended colour halos).
            layer = Image.fromarray(mask_views[name][view].astype(np.uint8) * 255)
            layer = layer.resize(size, Image.Resampling.NEAREST)
            inside = np.asarray(layer) > 0
            rgb[inside] = (1.0 - OVERLAY_ALPHA) * rgb[inside] + OVERLAY_ALPHA * np.array(colors[name], np.float32)
        panels[view] = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = probe.textbbox((0, 0), "Ag", font=font)[3] + 4
    width = max(_MARGIN_PX + sum(p.width + _MARGIN_PX for p in panels.values()), 240)
    # Legend entries flow left to right and wrap at the canvas width.
    entries = [(n, f"{n}" if np.any(masks_zyx[n]) else f"{n} (empty)") for n in names] or [(None, "no structures")]
    placed, x, y = [], _MARGIN_PX, 0
    for name, label in entries:
        entry_w = text_h + 4 + int(probe.textlength(label, font=font)) + 2 * _MARGIN_PX
        if x + entry_w > width and x > _MARGIN_PX:
            x, y = _MARGIN_PX, y + text_h + 4
        placed.append((name, label, x, y))
        x += entry_w
    panels_top = _MARGIN_PX + text_h
    panels_bottom = panels_top + max(p.height for p in panels.values())
    legend_top = panels_bottom + _MARGIN_PX
    height = legend_top + y + text_h + _MARGIN_PX

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    x = _MARGIN_PX
    titles = {
        "axial": f"axial z={centre[0]}", "coronal": f"coronal y={centre[1]}", "sagittal": f"sagittal x={centre[2]}"
    }  # fmt: skip
    for view, panel in panels.items():
        canvas.paste(panel, (x, panels_top))
        boxes[view] = (x, panels_top, x + panel.width, panels_top + panel.height)
        draw.text((x, _MARGIN_PX), titles[view], fill=_TEXT, font=font)
        x += panel.width + _MARGIN_PX
    for name, label, lx, ly in placed:
        top = legend_top + ly
        if name is not None:
            draw.rectangle((lx, top + 2, lx + text_h - 4, top + text_h - 2), fill=colors[name])
        draw.text((lx + text_h + 4 if name is not None else lx, top), label, fill=_TEXT, font=font)
    legend = (0, legend_top, width, height)
    return Preview(canvas, boxes, legend, centre, (low, high), colors)


def write_preview(
    image_zyx: np.ndarray,
    masks_zyx: Mapping[str, np.ndarray],
    spacing_mm: Sequence[float],
    path: Path,
    *,
    modality: str | None = None,
) -> Path:
    """Render the preview (see ``render_preview``) and write it to ``path`` as PNG, atomically."""
    path = Path(path)
    preview = render_preview(image_zyx, masks_zyx, spacing_mm, modality=modality)
    with staged_files(path.parent) as stage:
        preview.image.save(stage(path.name), format="PNG")
    return path
