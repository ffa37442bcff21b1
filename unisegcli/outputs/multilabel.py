"""``--multilabel``: all structures of a case in one label map plus its label table.

``segmentation.nii.gz`` holds label ids 1..N (0 = background) in the input's exact geometry,
``labels.json`` maps each id to its structure and the task it came from.

Ids follow the order of the masks given — the pipeline builds that order from the --tasks
order, then each task's label index — so "liver,kidney" gives liver's structures the low ids.
In a run of several models (``unisegcli.combination``) the order is the same --tasks order,
whatever model gives a task, and each labels.json entry names its "model".

Overlaps (the same voxel claimed by structures of different tasks — within one task labels
never overlap — e.g. an organ from an organ task and a tumour from a tumour task): the
structure listed FIRST wins; later structures only fill voxels still unlabelled. Put the task
whose structures must stay visible (the tumour task in the example) first in --tasks.
Voxels a structure lost this way are counted in labels.json ("voxels_lost_to_overlap"); the
per-structure masks keep every structure complete, overlaps included.

The map is uint8 for up to 255 structures and uint16 beyond.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import nibabel as nib

    from unisegcli.io.nifti import Scan

OVERLAP_RULE = "first listed wins: a voxel claimed by several structures keeps the lowest id"


@dataclass
class Multilabel:
    """A label map [Z, Y, X] (internal order) and its table id -> {name, task, lost voxels}."""

    labels_zyx: np.ndarray
    table: dict[int, dict[str, Any]]

    def labels_json(self) -> dict[str, Any]:
        """The ``labels.json`` document (ids as strings: JSON object keys)."""
        return {
            "background": 0,
            "overlap_rule": OVERLAP_RULE,
            "labels": {str(i): entry for i, entry in self.table.items()},
        }


def build_multilabel(masks_zyx: Mapping[str, np.ndarray], task_of: Mapping[str, str] | None = None,
                     model_of: Mapping[str, str] | None = None) -> Multilabel:
    """Combine masks into one label map; ids 1..N in the masks' order, first listed wins.

    masks_zyx: structure -> bool [Z, Y, X], all the same shape. task_of: structure -> task.
    model_of: structure -> model, for runs of several models (each entry then names its "model").
    """
    names = list(masks_zyx)
    if not names:
        raise ValueError("no structures to combine")
    shape = np.shape(masks_zyx[names[0]])
    dtype = np.uint8 if len(names) <= 255 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    table: dict[int, dict[str, Any]] = {}
    for label_id, name in enumerate(names, start=1):
        mask = np.asarray(masks_zyx[name], dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask '{name}' has shape {mask.shape}, expected {shape}")
        free = mask & (labels == 0)
        labels[free] = label_id
        table[label_id] = {
            "name": name,
            "task": (task_of or {}).get(name),
            **({"model": model_of.get(name)} if model_of is not None else {}),
            "voxels_lost_to_overlap": int(np.count_nonzero(mask) - np.count_nonzero(free)),
        }
    return Multilabel(labels, table)


def multilabel_image(multilabel: Multilabel, scan: "Scan") -> "nib.Nifti1Image":
    """The label map as an image with the scan's exact geometry (affine, q/sform codes, zooms)."""
    from unisegcli.io.nifti import label_image

    volume_ijk = scan.reorientation.to_file(multilabel.labels_zyx)
    if volume_ijk.dtype == np.uint8:
        return label_image(volume_ijk, scan.image)
    # label_image is uint8-only; beyond 255 structures keep its header, widen the dtype.
    image = label_image(np.zeros(volume_ijk.shape, np.uint8), scan.image)
    header = image.header.copy()
    header.set_data_dtype(np.uint16)
    return type(image)(np.asarray(volume_ijk, dtype=np.uint16), None, header=header)
