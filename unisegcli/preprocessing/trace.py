"""The record of what preprocessing did to a scan, so postprocessing can undo it in reverse.

nnU-Net v2 keeps the same facts in its ``properties`` dict (``shape_before_cropping``,
``bbox_used_for_cropping``, ``shape_after_cropping_and_before_resampling``, ``spacing``;
nnunetv2/preprocessing/preprocessors/default_preprocessor.py, ``run_case_npy``) and reads them
back in ``export_prediction.convert_predicted_logits_to_segmentation_with_correct_shape``. Here
each step is a small frozen record appended to a :class:`Trace` in the order it was applied;
``unisegcli.postprocessing.restore`` walks the steps backwards.

All shapes are spatial (z, y, x) in voxels; spacings are (z, y, x) in millimetres; boxes are
half-open voxel ranges ``((z0, z1), (y0, y1), (x0, x1))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

Shape3 = tuple[int, int, int]
Spacing3 = tuple[float, float, float]
Box3 = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class CropStep:
    """The scan was cropped to ``bbox`` (half-open, (z, y, x)) out of ``shape_before``."""

    shape_before: Shape3
    bbox: Box3

    @property
    def shape_after(self) -> Shape3:
        return tuple(hi - lo for lo, hi in self.bbox)  # type: ignore[return-value]


@dataclass(frozen=True)
class ResampleStep:
    """The cropped scan was resampled from ``spacing_before_mm`` to ``spacing_after_mm``.

    ``separate_z_axis`` is the axis resampled on its own (nearest neighbour) because the
    spacing was anisotropic, or None when all three axes were resampled together.
    """

    shape_before: Shape3
    shape_after: Shape3
    spacing_before_mm: Spacing3
    spacing_after_mm: Spacing3
    separate_z_axis: int | None
    order: int
    order_z: int


@dataclass(frozen=True)
class NormalizeStep:
    """Intensities were normalised per channel; geometry is unchanged, nothing to undo.

    ``schemes`` maps channel name to the scheme dict from the task card; ``statistics`` holds
    what was measured on this scan (z-score mean/std per channel), for reports.
    """

    schemes: Mapping[str, Mapping[str, object]]
    statistics: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


Step = Union[CropStep, ResampleStep, NormalizeStep]


@dataclass
class Trace:
    """Every preprocessing step, in the order applied, from the input grid to the network grid.

    original_shape: (z, y, x) of the input array (after the reader's reorientation);
    original_spacing_mm: its (z, y, x) spacing.
    """

    original_shape: Shape3
    original_spacing_mm: Spacing3
    steps: list[Step] = field(default_factory=list)

    def record(self, step: Step) -> None:
        """Append a step (preprocessing calls this right after it applied the step)."""
        self.steps.append(step)

    @property
    def crop(self) -> CropStep | None:
        """The crop step, or None when the scan was not cropped."""
        return next((s for s in self.steps if isinstance(s, CropStep)), None)

    @property
    def resample(self) -> ResampleStep | None:
        """The resampling step, or None when the spacing was already the target."""
        return next((s for s in self.steps if isinstance(s, ResampleStep)), None)

    @property
    def network_shape(self) -> Shape3:
        """(z, y, x) of the array that preprocessing hands to the network."""
        shape = self.original_shape
        for step in self.steps:
            if isinstance(step, CropStep):
                shape = step.shape_after
            elif isinstance(step, ResampleStep):
                shape = step.shape_after
        return shape

    @property
    def network_spacing_mm(self) -> Spacing3:
        """(z, y, x) spacing of the network grid in mm."""
        step = self.resample
        return step.spacing_after_mm if step is not None else self.original_spacing_mm
