"""Write a case's masks all-or-nothing, named by structure, in the scan's original geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from unisegcli.io.atomic import staged_files
from unisegcli.io.nifti import Scan, check_output_dir, label_image


class LabelMasks(Mapping[str, np.ndarray]):
    """Per-structure bool masks computed from label maps on each access, never stored.

    label_maps: task -> uint8 [Z, Y, X] label map; where: structure -> (task, label), in
    output order. A bool mask of a 512x512x400 scan is 105 MB, so a case with 11 structures
    would hold 1.2 GB of masks next to its label maps; ``label_map == label`` costs ~0.05 s
    there, cheaper than keeping it.
    """

    def __init__(self, label_maps: Mapping[str, np.ndarray], where: Mapping[str, tuple[str, int]]) -> None:
        self._label_maps = label_maps
        self._where = dict(where)

    def __getitem__(self, name: str) -> np.ndarray:
        task, label = self._where[name]
        return self._label_maps[task] == label

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def subset(self, names: Iterable[str]) -> "LabelMasks":
        """The masks of ``names`` only, in that order (still computed on access)."""
        return LabelMasks(self._label_maps, {n: self._where[n] for n in names})


def write_case_masks(masks_zyx: Mapping[str, np.ndarray], scan: Scan, folder: Path) -> dict[str, Path]:
    """Write ``<folder>/<structure>.nii.gz`` (uint8 0/1) for every mask.

    masks_zyx: structure name -> bool/uint8 [Z, Y, X] in internal orientation. All files of
    the case are staged first and renamed together, so a failure (disk full, interrupt)
    leaves no mask of this case that looks finished.
    """
    import nibabel as nib

    check_output_dir(folder)
    with staged_files(folder) as stage:
        for name, mask in masks_zyx.items():
            volume_ijk = scan.reorientation.to_file(np.asarray(mask, dtype=np.uint8))
            nib.save(label_image(volume_ijk, scan.image), str(stage(f"{name}.nii.gz")))
    return {name: folder / f"{name}.nii.gz" for name in masks_zyx}
