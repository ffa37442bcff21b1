"""Quality-control flags of a structure: facts about a mask worth a second look.

Flags describe; they never change a mask. Each structure of ``statistics.json`` carries a
``"qc"`` object, and the case a ``"flagged"`` summary (structure -> names of raised flags):

- ``empty``: the mask has no voxel.
- ``touches_edge``: the faces of the scan's field of view (its voxel grid) the mask touches,
  named by the patient direction they face: "left"/"right", "posterior"/"anterior",
  "inferior"/"superior" (RAS+: x grows to the patient's right, y anterior, z superior). Each
  grid axis is named by the patient axis it is closest to (nibabel's ``io_orientation``, the
  same choice as our reorientation), so an oblique scan's faces carry the nearest name. A
  structure cut by the field of view has an underestimated volume.
- ``volume_outside_range``: the volume is outside a published reference range for that
  structure name (``reference_ranges.volume_ml`` in the registry, each with its source and
  population). null where the registry holds no range for the name, or the mask is empty.
  ``reference_volume_ml`` gives the range used.
- ``fragmented``: more than ``FRAGMENT_MAX_PIECES`` connected components (26-connected) each
  hold at least ``FRAGMENT_MIN_SHARE`` of the structure's voxels — a second sizeable piece,
  not a few stray voxels. Lesions, tumours and "vertebrae" are often several pieces by nature.
- ``laterality``: the name says a side (a word "left"/"right" in it: ``kidney_left``,
  ``left_kidney``, ``left kidney``) and the centroid lies on the other side of the midline.
  null for names without a side and for empty masks. The midline is the x (left-right) of
  the centroid of a structure named "body" when the case has one, otherwise the x of the
  centre of the scan's field of view (recorded as ``midline_x_mm`` / ``midline_from``);
  a field of view not centred on the patient makes this flag unreliable.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

FRAGMENT_MIN_SHARE = 0.05  # a piece counts when it holds >= 5 % of the structure's voxels
FRAGMENT_MAX_PIECES = 1  # more counting pieces than this: fragmented
QC_FLAGS = ("empty", "touches_edge", "volume_outside_range", "fragmented", "laterality")
QC_CONVENTIONS = {
    "touches_edge": "faces of the field of view the mask touches, named by the patient direction "
                    "they face (left/right, posterior/anterior, inferior/superior; nearest axis)",
    "volume_outside_range": "volume outside the registry's published reference range for the "
                            "structure name (null: no range known, or empty mask)",
    "fragmented": f"more than {FRAGMENT_MAX_PIECES} 26-connected component(s) each holding >= "
                  f"{FRAGMENT_MIN_SHARE:.0%} of the structure's voxels",
    "laterality": "a structure named left/right whose centroid lies across the midline "
                  "(midline: centroid x of a 'body' structure, else the field of view's centre x)",
}  # fmt: skip
# Internal (z, y, x) axes are RAS-ordered: index 0 of each axis faces the first name.
_FACES = (("inferior", "superior"), ("posterior", "anterior"), ("left", "right"))
_SIDE_WORDS = re.compile(r"[^a-z]+")


def edge_faces(lo_zyx: Sequence[int], hi_zyx: Sequence[int], shape_zyx: Sequence[int]) -> list[str]:
    """Faces of the grid a bounding box touches, in patient terms.

    lo_zyx, hi_zyx: inclusive internal (z, y, x) box of the mask; shape_zyx: the grid's shape.
    """
    faces = []
    for axis in (2, 1, 0):  # left/right first: the order people read positions in
        low, high = _FACES[axis]
        if lo_zyx[axis] == 0:
            faces.append(low)
        if hi_zyx[axis] == shape_zyx[axis] - 1:
            faces.append(high)
    return faces


def counting_pieces(sizes: np.ndarray) -> int:
    """Components holding at least FRAGMENT_MIN_SHARE of the voxels (sizes: voxel counts)."""
    total = int(np.sum(sizes))
    if total == 0:
        return 0
    return int(np.count_nonzero(np.asarray(sizes) >= FRAGMENT_MIN_SHARE * total))


def side_of(name: str) -> str | None:
    """"left"/"right" when the structure name says a side (as a whole word), else None."""
    words = set(_SIDE_WORDS.split(name.lower()))
    sides = words & {"left", "right"}
    return next(iter(sides)) if len(sides) == 1 else None


def laterality_flag(name: str, centroid_x_mm: float | None, midline_x_mm: float) -> bool | None:
    """True when a sided structure's centroid is across the midline (RAS: right is +x)."""
    side = side_of(name)
    if side is None or centroid_x_mm is None:
        return None
    return centroid_x_mm < midline_x_mm if side == "right" else centroid_x_mm > midline_x_mm


def volume_flag(volume_ml: float, voxel_count: int, reference: Mapping[str, Any] | None) -> bool | None:
    """True when a non-empty structure's volume is outside its reference range."""
    if reference is None or voxel_count == 0:
        return None
    return not (float(reference["min"]) <= volume_ml <= float(reference["max"]))


def reference_ranges() -> dict[str, dict[str, Any]]:
    """structure name -> {"min", "max", "source", ...} volume ranges (ml) of the registry in use.

    Read from ``reference_ranges.volume_ml`` of the registry file ($UNISEG_REGISTRY or the
    shipped one); a registry without that section gives no ranges (no flags).
    """
    import json

    from unisegcli.weights.cards import registry_path

    path = registry_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the registry's own loader reports a broken file where it matters
    ranges = (data.get("reference_ranges") or {}).get("volume_ml") or {}
    return {str(k).lower(): dict(v) for k, v in ranges.items() if isinstance(v, dict)}


def midline_x(structures: Mapping[str, Mapping[str, Any]], centre_x_mm: float) -> tuple[float, str]:
    """(midline x in mm, where it came from): a "body" structure's centroid, else the FOV centre."""
    body = structures.get("body")
    if body is not None and body.get("centroid_world_mm"):
        return float(body["centroid_world_mm"][0]), "body"
    return float(centre_x_mm), "field_of_view_centre"


def add_case_flags(statistics: dict[str, Any], centre_x_mm: float,
                   ranges: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Complete each structure's "qc" (volume range, laterality) and the case's "flagged".

    statistics: a ``case_statistics`` document whose structures already hold "qc" with
    "empty", "touches_edge" and "fragmented". centre_x_mm: world x of the grid's centre.
    """
    ranges = reference_ranges() if ranges is None else ranges
    structures = statistics["structures"]
    midline, origin = midline_x(structures, centre_x_mm)
    statistics["midline_x_mm"], statistics["midline_from"] = midline, origin
    flagged: dict[str, list[str]] = {}
    for name, rec in structures.items():
        qc = rec["qc"]
        reference = ranges.get(name.lower())
        qc["volume_outside_range"] = volume_flag(rec["volume_ml"], rec["voxel_count"], reference)
        qc["reference_volume_ml"] = (
            {"min": float(reference["min"]), "max": float(reference["max"]), "source": str(reference.get("source", ""))}
            if reference is not None else None
        )
        centroid = rec["centroid_world_mm"]
        qc["laterality"] = laterality_flag(name, centroid[0] if centroid else None, midline)
        raised = [flag for flag in QC_FLAGS if qc.get(flag)]
        if raised:
            flagged[name] = raised
    statistics["flagged"] = flagged
    return statistics
