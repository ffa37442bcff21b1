"""Which series of a DICOM study folder to segment: documented rules, kept as data.

A study folder often holds several series: a localizer, thin and thick reconstructions,
contrast phases, dose screenshots. When an input holds more than one series (and no
``--series UID`` is given), one series per channel of the task is taken by these rules
(README, "DICOM studies"):

Exclusions (rules 1-4): a series that fails one is never taken.
  1. modality: the series' Modality must fit the channel (``CHANNEL_MODALITIES``: "ct" -> CT,
     "pet" -> PT, MR channels -> MR); without a known channel, non-image modalities (SEG,
     RTSTRUCT, SR...) are excluded.
  2. localizer: ImageType holds LOCALIZER/SCOUT/TOPOGRAM..., or the description names one.
  3. secondary capture: a Secondary Capture SOP class (screenshots, dose reports).
  4. not a volume: fewer than ``MIN_SLICES`` slices, or no ImagePositionPatient /
     ImageOrientationPatient.
Preferences (rules 5-10), in this order, among the rest:
  5. ORIGINAL/PRIMARY ImageType before DERIVED/SECONDARY (reformats, MIPs).
  6. axial (slice normal nearest the patient's foot-head axis) before coronal/sagittal.
  7. PET: attenuation-corrected (CorrectedImage holds ATTN) before uncorrected (NAC).
  8. most slices.
  9. thinnest slices (spacing of the positions along the normal; SliceThickness when the
     positions do not tell).
 10. lowest SeriesNumber, then UID: the choice never depends on file order.

The same rules as dcm2niix's ``-i y`` (ignore derived, localizer and 2D images;
rordenlab/dcm2niix console/nii_dicom_batch.cpp) and TotalSegmentator's advice to pass the
thin axial series, made into a choice instead of a filter. Only headers are read; nothing
here quotes patient data (descriptions go through the caller's redactor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from unisegcli.io.dicom_series import SeriesInfo, number_of_frames

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

Members = list[tuple[str, "Dataset"]]

# Task channel name -> DICOM Modality values that fit it (PET is "PT" in DICOM).
CHANNEL_MODALITIES: Mapping[str, tuple[str, ...]] = {
    "ct": ("CT",), "pet": ("PT",), "mr": ("MR",), "t1": ("MR",), "t1ce": ("MR",), "t2": ("MR",),
    "flair": ("MR",), "adc": ("MR",), "dwi": ("MR",),
}  # fmt: skip
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC", "OT"})
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "SCANOGRAM"})
LOCALIZER_WORDS = ("localizer", "localiser", "scout", "topogram", "surview", "scanogram", "survey")
SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.7"} | {f"1.2.840.10008.5.1.4.1.1.7.{n}" for n in range(1, 5)}
)
MIN_SLICES = 3  # two slices are not a volume any model was trained on
PLANES = ("sagittal", "coronal", "axial")  # by the largest component of the slice normal (x, y, z)


@dataclass(frozen=True)
class SeriesChoice:
    """The series taken for one channel, and why, in words without patient data."""

    channel: str | None
    info: SeriesInfo
    reason: str
    seen: int  # series in the input

    def line(self) -> str:
        channel = f" for channel '{self.channel}'" if self.channel else ""
        return f"took series {self.info.line()}{channel} of {self.seen} series: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        info = self.info
        return {
            "channel": self.channel, "series_instance_uid": info.uid, "series_number": info.number,
            "description": info.description, "modality": info.modality, "slices": info.slice_count,
            "slice_spacing_mm": info.thickness_mm, "plane": info.plane, "image_type": info.image_type,
            "series_in_input": self.seen, "reason": self.reason, "summary": self.line(),
        }  # fmt: skip


def _floats(value: Any, count: int) -> np.ndarray | None:
    try:
        numbers = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return numbers if numbers.shape == (count,) and np.all(np.isfinite(numbers)) else None


def _shared(ds: "Dataset", sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced multi-frame file's shared functional groups, or None."""
    try:
        return getattr(getattr(ds.SharedFunctionalGroupsSequence[0], sequence)[0], keyword, None)
    except (AttributeError, IndexError, TypeError):
        return None


def _geometry(members: Members) -> tuple[str | None, float | None]:
    """(plane, slice spacing mm) from the headers, None where they do not tell."""
    first = members[0][1]
    iop = _floats(first.get("ImageOrientationPatient") or _shared(first, "PlaneOrientationSequence",
                                                                    "ImageOrientationPatient") or (), 6)
    if iop is None or np.abs(iop).max() > 1.01:  # direction cosines; the reader says what is wrong
        return None, None
    normal = np.cross(iop[:3], iop[3:])
    if np.linalg.norm(normal) < 1e-3:
        return None, None
    plane = PLANES[int(np.argmax(np.abs(normal)))]
    positions = [_floats(ds.get("ImagePositionPatient") or (), 3) for _, ds in members]
    along = sorted(float(p @ normal) for p in positions if p is not None)
    steps = [b - a for a, b in zip(along, along[1:]) if b - a > 1e-3]
    if steps:
        return plane, round(float(np.median(steps)), 4)
    thickness = first.get("SliceThickness") or _shared(first, "PixelMeasuresSequence", "SliceThickness")
    try:
        value = float(thickness) if thickness not in (None, "") else float("nan")
    except (TypeError, ValueError):
        value = float("nan")
    return plane, round(value, 4) if np.isfinite(value) and value > 0 else None  # JSON has no NaN


def describe_series(uid: str, members: Members) -> SeriesInfo:
    """The listing facts of one series (no patient data)."""
    first = members[0][1]
    folders = {str(PurePosixPath(name).parent) for name, _ in members}
    plane, spacing = _geometry(members)
    image_type = first.get("ImageType") or ()
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    return SeriesInfo(
        uid=uid,
        description=str(getattr(first, "SeriesDescription", "") or "")[:64],
        number=_series_number(first),
        modality=str(getattr(first, "Modality", "") or "").strip().upper(),
        slice_count=sum(number_of_frames(ds) for _, ds in members),
        subfolder=folders.pop() if len(folders) == 1 else None,
        image_type="\\".join(str(v).strip().upper() for v in image_type),
        sop_class_uid=str(first.get("SOPClassUID", "") or ""),
        plane=plane,
        thickness_mm=spacing,
        has_geometry=plane is not None and (number_of_frames(first) > 1 or "ImagePositionPatient" in first),
        attenuation_corrected=_attenuation_corrected(first),
    )


def _attenuation_corrected(ds: "Dataset") -> bool | None:
    if str(ds.get("Modality", "") or "").strip().upper() != "PT":
        return None
    corrected = ds.get("CorrectedImage") or ()
    return "ATTN" in ([corrected] if isinstance(corrected, str) else [str(v).strip().upper() for v in corrected])


def _series_number(ds: "Dataset") -> int | None:
    try:
        return int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        return None


def exclusion(info: SeriesInfo, channel: str | None) -> str | None:
    """Why a series cannot be taken for ``channel`` (rules 1-4), or None."""
    wanted = CHANNEL_MODALITIES.get(channel or "")
    if wanted is not None and info.modality not in wanted:
        return f"modality {info.modality or 'missing'}, expected {'/'.join(wanted)}"
    if wanted is None and info.modality in NON_IMAGE_MODALITIES:
        return f"modality {info.modality} is not an image"
    types = set(info.image_type.split("\\"))
    if types & LOCALIZER_IMAGE_TYPES or any(w in info.description.lower() for w in LOCALIZER_WORDS):
        return "localizer"
    if info.sop_class_uid in SECONDARY_CAPTURE_SOP_CLASSES:
        return "secondary capture"
    if info.slice_count < MIN_SLICES:
        return f"{info.slice_count} slice(s), expected at least {MIN_SLICES}"
    if not info.has_geometry:
        return "no slice position/orientation"
    return None


def _is_original(info: SeriesInfo) -> bool:
    types = info.image_type.split("\\")
    return types[:1] != ["DERIVED"] and "SECONDARY" not in types[1:2]


def _rank(info: SeriesInfo) -> tuple:
    """Sort key of rules 5-10: smaller is better."""
    thickness = info.thickness_mm if info.thickness_mm is not None else float("inf")
    number = info.number if info.number is not None else 1 << 31
    return (not _is_original(info), info.plane != "axial", info.attenuation_corrected is False, -info.slice_count,
            thickness, number, info.uid)


def _why(best: SeriesInfo, runner_up: SeriesInfo | None, usable: int) -> str:
    """The first preference (rules 5-10) that puts ``best`` before the runner-up, in words."""
    if runner_up is None:
        return "the only usable series"
    other = _name(runner_up)
    if _is_original(best) != _is_original(runner_up):
        return f"ORIGINAL/PRIMARY ({other} is {runner_up.image_type or 'derived'}), of {usable} usable"
    if (best.plane == "axial") != (runner_up.plane == "axial"):
        return f"axial ({other} is {runner_up.plane or 'of unknown plane'}), of {usable} usable"
    if (best.attenuation_corrected is False) != (runner_up.attenuation_corrected is False):
        return f"attenuation-corrected PET ({other} is not), of {usable} usable"
    if best.slice_count != runner_up.slice_count:
        return f"most slices ({best.slice_count}; {other} has {runner_up.slice_count}), of {usable} usable"
    if best.thickness_mm != runner_up.thickness_mm:
        return (f"thinnest slices ({_mm(best.thickness_mm)}; {other} has {_mm(runner_up.thickness_mm)}), "
                f"of {usable} usable")
    return f"lowest series number/UID among {usable} equally good series"


def _mm(value: float | None) -> str:
    return f"{value:g} mm" if value is not None else "unknown spacing"


def _name(info: SeriesInfo) -> str:
    return f"#{info.number}" if info.number is not None else info.uid or "(no UID)"


def choose_series(
    series: Mapping[str, Members], channels: Sequence[str | None], quote: Callable[[str], str],
) -> list[tuple[SeriesChoice, Members]]:  # fmt: skip
    """One (choice, members) per channel by rules 1-10, in ``channels`` order.

    quote: applied to every text taken from the headers (the caller's patient-data redactor).
    Raises NoUsableSeries, whose text lists every series seen and why it was excluded.
    """
    infos = [describe_series(uid, members) for uid, members in series.items()]
    infos.sort(key=lambda i: (i.number is None, i.number or 0, i.uid))
    chosen = []
    for channel in channels or (None,):
        usable = sorted((i for i in infos if exclusion(i, channel) is None), key=_rank)
        if not usable:
            raise NoUsableSeries(channel, "; ".join(f"{quote(i.line())} ({exclusion(i, channel)})" for i in infos))
        best = usable[0]
        reason = _why(best, usable[1] if len(usable) > 1 else None, len(usable))
        skipped = [f"{_name(i)} ({exclusion(i, channel)})" for i in infos if exclusion(i, channel)]
        if skipped:
            reason += "; excluded " + ", ".join(skipped)
        choice = SeriesChoice(channel, replace(best, description=quote(best.description)), quote(reason), len(infos))
        chosen.append((choice, series[best.uid]))
    return chosen


class NoUsableSeries(Exception):
    """No series fits a channel; ``seen`` lists every series and why it was excluded (one
    line, redacted). The caller turns it into a DicomSeriesError naming its input."""

    def __init__(self, channel: str | None, seen: str) -> None:
        super().__init__(seen)
        self.channel, self.seen = channel, seen
