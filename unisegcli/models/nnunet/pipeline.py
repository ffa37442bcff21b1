"""nnU-Net v2 preprocessing and export on torch, for one results folder's plans.

Follows nnU-Net v2.8.1 (MIC-DKFZ/nnUNet) step by step:

1. the plans' reader (``plans["image_reader_writer"]``): ``NibabelIOWithReorient`` and
   ``SimpleITKIOWithReorient`` give the RAS-reoriented array (S, A, R) = our internal array; ``SimpleITKIO``/``NibabelIO`` give the
   file's voxel order reversed (k, j, i) with the file's zooms reversed
   (``imageio/simpleitk_reader_writer.py``, ``imageio/nibabel_reader_writer.py``);
2. ``transpose_forward`` on array axes and spacing (``DefaultPreprocessor.run_case_npy``);
3. crop to the non-zero box (``preprocessing/cropping/cropping.py``);
4. normalise per channel *before* resampling
   (``preprocessing/normalization/default_normalization_schemes.py``);
5. resample to the configuration spacing (``resample_data_or_seg_to_shape``, order 3 / order_z 0);
6. export (``inference/export_prediction.py``): resample the logits back with order 1, argmax
   (labels) or sigmoid > 0.5 in ``regions_class_order`` (regions), paste into the crop box,
   ``transpose_backward``, and back to the reader's layout.

The crop and resampling are recorded in a ``preprocessing.trace.Trace`` (in the transposed
reader layout), so ``postprocessing.restore`` undoes them as for every other family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from unisegcli.errors import CheckpointError
from unisegcli.preprocessing.crop import crop_to_bbox, insert_into_bbox, nonzero_bbox
from unisegcli.preprocessing.normalize import ZSCORE_EPS, normalize_channel
from unisegcli.preprocessing.resample import compute_new_shape, resample_to_shape, separate_z_axis
from unisegcli.preprocessing.trace import CropStep, NormalizeStep, ResampleStep, Trace

if TYPE_CHECKING:
    import torch

    from unisegcli.io.nifti import Scan
    from unisegcli.models.nnunet.folder import Label, ResultsFolder
    from unisegcli.postprocessing.restore import RowsOf

REORIENTING_READERS = ("NibabelIOWithReorient", "SimpleITKIOWithReorient")  # both: closest RAS, (S, A, R)
FILE_ORDER_READERS = ("SimpleITKIO", "NibabelIO")
SCHEMES = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
           "RGBTo01Normalization")


@dataclass(frozen=True)
class Layout:
    """How our internal [C, Z, Y, X] array relates to the array nnU-Net's reader gives.

    reorient: False = the same array (a reorienting reader); True = the file's voxel order
    reversed, reached through the scan's ``Reorientation``. transpose: plans'
    ``transpose_forward``.
    """

    reorient: bool
    transpose: tuple[int, int, int]


def reader_layout(folder: "ResultsFolder") -> Layout:
    """The layout the plans' reader and ``transpose_forward`` ask for."""
    reader = str(folder.plans.get("image_reader_writer") or folder.dataset.get("overwrite_image_reader_writer")
                 or "SimpleITKIO")
    if reader not in REORIENTING_READERS + FILE_ORDER_READERS:
        raise CheckpointError(
            f"{folder.path.name}: plans.json reads images with {reader}; expected one of "
            f"{', '.join(REORIENTING_READERS + FILE_ORDER_READERS)} (3D NIfTI readers). Models for other "
            "image types are not supported."
        )
    transpose = tuple(int(a) for a in folder.plans.get("transpose_forward", (0, 1, 2)))
    if sorted(transpose) != [0, 1, 2]:
        raise CheckpointError(f"{folder.path.name}: plans.json transpose_forward {transpose} is not a "
                              "permutation of (0, 1, 2); the plans file is damaged.")
    return Layout(reader in FILE_ORDER_READERS, transpose)  # type: ignore[arg-type]


def to_network_layout(image_czyx: np.ndarray, spacing_mm: Sequence[float], scan: "Scan | None",
                      layout: Layout) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Our internal array/spacing -> the reader's array, transposed by ``transpose_forward``."""
    data, spacing = image_czyx, tuple(float(s) for s in spacing_mm)
    if layout.reorient:
        if scan is None:
            raise ValueError("a file-order reader needs the scan's reorientation")
        transform = np.asarray(scan.reorientation.transform)
        ijk = scan.reorientation.to_file(np.moveaxis(data, 0, -1))  # [i, j, k, C]
        data = np.moveaxis(ijk, -1, 0).transpose(0, 3, 2, 1)  # [C, k, j, i]
        ras_spacing = spacing[::-1]  # (x, y, z)
        file_zooms = [ras_spacing[int(transform[i, 0])] for i in range(3)]
        spacing = tuple(file_zooms[::-1])  # (k, j, i)
    t = layout.transpose
    data = data.transpose(0, *(a + 1 for a in t))
    return np.ascontiguousarray(data), tuple(spacing[a] for a in t)  # type: ignore[return-value]


def from_network_layout(labels: np.ndarray, scan: "Scan | None", layout: Layout) -> np.ndarray:
    """Inverse of ``to_network_layout`` for [..., z, y, x] arrays (labels or probabilities)."""
    lead = labels.ndim - 3
    back = np.argsort(layout.transpose)
    out = labels.transpose(*range(lead), *(lead + int(a) for a in back))
    if layout.reorient:
        assert scan is not None
        ijk = out.transpose(*range(lead + 2, lead - 1, -1), *range(lead))  # [i, j, k, (C)]
        internal = scan.reorientation.to_internal(ijk)  # [z, y, x, (C)]
        out = np.moveaxis(internal, -1, 0) if lead else internal
    return np.ascontiguousarray(out)


def _fill_holes_mask(image_czyx: np.ndarray) -> np.ndarray:
    """nnU-Net's non-zero mask: any channel != 0, holes filled (``create_nonzero_mask``)."""
    mask = np.any(image_czyx != 0, axis=0)
    try:
        from scipy.ndimage import binary_fill_holes
    except ImportError as exc:  # scipy comes with the nnunet extra
        raise CheckpointError("this model normalises inside the body mask (use_mask_for_norm) and needs "
                              "scipy; install the nnunet extra: pip install 'uniseg[nnunet]'.") from exc
    return binary_fill_holes(mask)


def normalize_channel_nnunet(x: "torch.Tensor", scheme: str, use_mask: bool, mask: "torch.Tensor | None",
                             properties: Mapping[str, Any] | None) -> tuple["torch.Tensor", dict[str, float]]:
    """One [Z, Y, X] float32 channel normalised as nnU-Net's scheme class ``scheme`` does."""
    import torch

    if scheme == "CTNormalization":
        if not properties:
            raise CheckpointError("plans.json lacks foreground_intensity_properties_per_channel, which "
                                  "CTNormalization needs; the plans file is incomplete.")
        return normalize_channel(x, {"scheme": "ct_clip_zscore",
                                     "clip": [properties["percentile_00_5"], properties["percentile_99_5"]],
                                     "mean": properties["mean"], "std": properties["std"]})
    if scheme == "ZScoreNormalization":
        if use_mask and mask is not None:
            x64 = x.to(torch.float64)
            mean = float(x64[mask].mean())
            std = float(x64[mask].std(correction=0))
            out = torch.where(mask, (x64 - mean) / max(std, ZSCORE_EPS), torch.zeros_like(x64))
            return out.to(x.dtype), {"mean": mean, "std": std}
        return normalize_channel(x, {"scheme": "zscore"})
    if scheme == "NoNormalization":
        return x, {}
    if scheme == "RescaleTo01Normalization":
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / max(hi - lo, ZSCORE_EPS), {"min": lo, "max": hi}
    if scheme == "RGBTo01Normalization":
        return x / 255.0, {}
    raise CheckpointError(f"plans.json asks for normalisation {scheme!r}; expected one of {', '.join(SCHEMES)}. "
                          "Custom normalisation classes are not supported.")


@dataclass
class Prepared:
    """A case in the network grid: the tensor, its trace and the layout to go back."""

    tensor: "torch.Tensor"  # float32 [C, z, y, x] on the device
    trace: Trace  # in the transposed reader layout
    layout: Layout


def preprocess_case(image_czyx: np.ndarray, spacing_mm: Sequence[float], scan: "Scan | None",
                    folder: "ResultsFolder", device: "str | torch.device" = "cpu",
                    compute_dtype: "torch.dtype | None" = None) -> Prepared:
    """nnU-Net v2 ``DefaultPreprocessor.run_case`` for our internal [C, Z, Y, X] image (float)."""
    import torch

    config = folder.configuration
    layout = reader_layout(folder)
    data, spacing = to_network_layout(np.asarray(image_czyx, dtype=np.float32), spacing_mm, scan, layout)
    target = tuple(float(s) for s in config["spacing"])
    if len(target) == 2:  # a 2D configuration keeps axis 0 (nnU-Net: spacing [original z, *target])
        target = (spacing[0], *target)
    trace = Trace(original_shape=tuple(data.shape[1:]), original_spacing_mm=spacing)  # type: ignore[arg-type]
    bbox = nonzero_bbox(data)
    trace.record(CropStep(shape_before=trace.original_shape, bbox=bbox))
    cropped = np.ascontiguousarray(crop_to_bbox(data, bbox), dtype=np.float32)

    schemes = list(config["normalization_schemes"])
    if len(schemes) != cropped.shape[0]:
        raise CheckpointError(f"{folder.path.name}: {len(schemes)} normalisation schemes for "
                              f"{cropped.shape[0]} input channels; plans.json and dataset.json disagree.")
    use_mask = list(config.get("use_mask_for_norm") or [False] * len(schemes))
    mask = torch.from_numpy(_fill_holes_mask(cropped)).to(device) if any(use_mask) else None
    properties = folder.plans.get("foreground_intensity_properties_per_channel") or {}
    x = torch.from_numpy(cropped).to(device)
    channels, stats = [], []
    for c, scheme in enumerate(schemes):
        y, s = normalize_channel_nnunet(x[c], scheme, bool(use_mask[c]), mask, properties.get(str(c)))
        channels.append(y)
        stats.append(s)
    x = torch.stack(channels)
    names = list(folder.channel_names)
    trace.record(NormalizeStep(schemes={n: {"scheme": s} for n, s in zip(names, schemes)},
                               statistics=dict(zip(names, stats))))

    kwargs = config.get("resampling_fn_data_kwargs") or {}
    order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
    force = kwargs.get("force_separate_z")
    shape_before = tuple(x.shape[1:])
    new_shape = compute_new_shape(shape_before, spacing, target)
    x = resample_to_shape(x, new_shape, spacing, target, order=order, order_z=order_z,
                          force_separate_z=force, compute_dtype=compute_dtype)
    trace.record(ResampleStep(shape_before=shape_before, shape_after=new_shape,  # type: ignore[arg-type]
                              spacing_before_mm=spacing, spacing_after_mm=target,  # type: ignore[arg-type]
                              separate_z_axis=separate_z_axis(spacing, target, force),
                              order=order, order_z=order_z))
    return Prepared(x.contiguous(), trace, layout)


def _export_steps(trace: Trace) -> tuple[list[ResampleStep], CropStep | None]:
    resamples = [s for s in trace.steps if isinstance(s, ResampleStep)]
    crop = trace.crop
    return resamples, crop


def resample_logits(logits: "torch.Tensor", trace: Trace, folder: "ResultsFolder") -> "torch.Tensor":
    """[K, z, y, x] network-grid logits -> the cropped input grid (order 1, order_z 0)."""
    import torch

    kwargs = folder.configuration.get("resampling_fn_probabilities_kwargs") or {}
    half = logits.dtype == torch.float16
    # nnU-Net resamples float16 logits in float64 and stores float16 (one rounding, numpy's);
    # torch's float64 -> float16 cast rounds twice (through float32), so numpy casts here.
    out = logits.double() if half else logits
    for step in reversed(_export_steps(trace)[0]):
        out = resample_to_shape(out, step.shape_before, step.spacing_after_mm, step.spacing_before_mm,
                                order=int(kwargs.get("order", 1)), order_z=int(kwargs.get("order_z", 0)),
                                force_separate_z=kwargs.get("force_separate_z"))
    if half:
        out = torch.from_numpy(out.cpu().numpy().astype(np.float16)).to(logits.device)
    return out


def _logit_rows(logits: "torch.Tensor", trace: Trace, folder: "ResultsFolder") -> "RowsOf | None":
    """``resample_logits`` for one class and a window of output rows (None: the trace does
    not resample exactly once, which ``preprocess_case`` always does)."""
    import torch

    from unisegcli.postprocessing.restore import rows_resampler

    steps = _export_steps(trace)[0]
    if len(steps) != 1:
        return None
    kwargs = folder.configuration.get("resampling_fn_probabilities_kwargs") or {}
    half = logits.dtype == torch.float16
    wide = torch.float64 if half else None  # as resample_logits: float64, then numpy's float16 cast
    resampled = rows_resampler(logits, steps[0], order=int(kwargs.get("order", 1)),
                               order_z=int(kwargs.get("order_z", 0)),
                               force_separate_z=kwargs.get("force_separate_z"), compute_dtype=wide, out_dtype=wide)
    if not half:
        return resampled

    def rows_of(k: int, lo: int, hi: int) -> "torch.Tensor":
        out = resampled(k, lo, hi)
        if out.dtype != torch.float64:  # not resampled (same shape): already float16
            return out
        return torch.from_numpy(out.cpu().numpy().astype(np.float16)).to(out.device)

    return rows_of


def export_segmentation(logits: "torch.Tensor", prepared: Prepared, folder: "ResultsFolder",
                        scan: "Scan | None", *, slab_voxels: int | None = None,
                        observe: "Callable[[torch.Tensor], None] | None" = None) -> np.ndarray:
    """nnU-Net's label map (uint8, its label values) in our internal [Z, Y, X] grid.

    Regions: sigmoid > 0.5 (logit > 0) paints ``regions_class_order[i]`` for region i in order.
    Labels: a running argmax (the lower label wins ties, as ``argmax``). Channels are resampled
    one at a time (nnU-Net resamples each channel on its own) and, as in
    ``postprocessing.restore.label_map_in_slabs``, a slab of rows at a time: neither the
    full-resolution [K, Z, Y, X] array nor a full-resolution float volume ever exists
    (``slab_voxels``, ``observe``: see there).
    """
    from unisegcli.postprocessing.restore import label_map_in_slabs

    regions = [label.value for label in folder.labels()] if folder.is_regions else None
    rows_of = _logit_rows(logits, prepared.trace, folder)
    if rows_of is None:
        labels = _export_whole_channels(logits, prepared, folder, regions)
    else:
        shape = _export_steps(prepared.trace)[0][0].shape_before  # the crop box's shape
        labels = label_map_in_slabs(logits.shape[0], shape, rows_of, device=logits.device, region_values=regions,
                                    slab_voxels=slab_voxels, observe=observe).cpu().numpy()
    crop = prepared.trace.crop
    if crop is not None:
        labels = insert_into_bbox(np.zeros(crop.shape_before, dtype=np.uint8), labels, crop.bbox)
    return from_network_layout(labels, scan, prepared.layout)


def _export_whole_channels(logits: "torch.Tensor", prepared: Prepared, folder: "ResultsFolder",
                           regions: Sequence[int] | None) -> np.ndarray:
    """The label map over the crop box, one whole channel at a time (any trace)."""
    import torch

    seg: "torch.Tensor | None" = None
    best: "torch.Tensor | None" = None
    for k in range(logits.shape[0]):
        channel = resample_logits(logits[k:k + 1], prepared.trace, folder)[0]
        if seg is None:
            seg = torch.zeros(channel.shape, dtype=torch.uint8, device=channel.device)
        if regions is not None:
            seg[channel > 0] = regions[k]
        elif best is None:
            best = channel.clone()
        else:
            better = channel > best
            best = torch.where(better, channel, best)
            seg.masked_fill_(better, k)
    assert seg is not None
    return seg.cpu().numpy()


def export_probabilities(logits: "torch.Tensor", prepared: Prepared, folder: "ResultsFolder",
                         scan: "Scan | None") -> np.ndarray:
    """Float32 [K, Z, Y, X] class probabilities in our internal grid (nnU-Net's ``.npz``):
    softmax (sigmoid for regions) of the resampled logits; outside the crop box (1, 0, ...)."""
    import torch

    resampled = resample_logits(logits, prepared.trace, folder).float()
    probs = torch.sigmoid(resampled) if folder.is_regions else torch.softmax(resampled, dim=0)
    part = probs.cpu().numpy()
    crop = prepared.trace.crop
    if crop is not None:
        full = np.zeros((part.shape[0], *crop.shape_before), dtype=np.float32)
        if not folder.is_regions:
            full[0] = 1.0
        part = insert_into_bbox(full, part, crop.bbox)
    return from_network_layout(part, scan, prepared.layout)


class StructureMaps(Mapping[str, np.ndarray]):
    """task -> uint8 0/1 map [Z, Y, X], computed from its part's label map on each access and
    never stored: the 117 structures of TotalSegmentator's ``total`` on a 512 x 512 x 300 scan
    would hold 9 GB of maps beside one 79 MB label map (``outputs.masks.LabelMasks`` then
    compares each with its label one at a time, while it is written)."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[np.ndarray, "Label"]] = {}

    def add(self, name: str, labels: np.ndarray, label: "Label") -> None:
        self._where[name] = (labels, label)

    def __getitem__(self, name: str) -> np.ndarray:
        labels, label = self._where[name]
        return structure_mask(labels, label)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def structure_mask(labels: np.ndarray, label: "Label") -> np.ndarray:
    """uint8 0/1 mask of one structure from nnU-Net's label map (a region: any of its labels)."""
    if label.region is not None:
        return np.isin(labels, label.region).astype(np.uint8)
    return (labels == label.value).astype(np.uint8)
