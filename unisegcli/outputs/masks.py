"""Write a case's masks all-or-nothing, named by structure, in the scan's original geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from unisegcli.io.atomic import staged_files
from unisegcli.io.nifti import Scan, check_output_dir, label_image


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
