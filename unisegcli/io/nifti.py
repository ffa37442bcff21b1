"""Read and write NIfTI images; move between the file's voxel order and our internal one.

Internal orientation: the closest canonical (RAS+) voxel order, stored as numpy arrays
[C, Z, Y, X] with Z = superior, Y = anterior, X = right, and ``spacing_mm`` as (z, y, x).
Only axis permutations and flips are applied (nibabel's ``io_orientation``), never
resampling, so an oblique affine stays oblique and going back is exact.

Masks are written with the input's exact shape, affine, qform/sform codes and zooms, and
always atomically: a temporary name in the target folder, then ``os.replace``.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unisegcli.io.atomic import WRITE_PROBE_PREFIX, staged_files
from unisegcli.io.nifti_header import (
    MAX_SPACING_MM,
    MAX_VOXELS_ENV,
    RawHeader,
    read_gz_voxels,
    read_raw_header,
    require_regular_file,
)
from unisegcli.errors import (
    HostMemoryError,
    ImageFormatError,
    ImageShapeError,
    ImageValueError,
    InputNotFoundError,
    OutputError,
)

if TYPE_CHECKING:
    import nibabel as nib

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_name(path: Path) -> bool:
    """True for names ending in .nii or .nii.gz (case-insensitive)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def case_id(path: Path) -> str:
    """The case id of a scan: its file name without .nii/.nii.gz."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Reorientation:
    """How a file's voxel order was turned into the internal (z, y, x) order.

    ``transform`` is nibabel's [3, 2] orientation transform from the file's axes to RAS
    (row i: which RAS axis file axis i goes to, and whether it is flipped). ``file_shape`` is
    the file's spatial shape (i, j, k). ``internal_affine`` maps internal voxel indices
    (z, y, x) to world mm (RAS), for statistics and previews.
    """

    transform: np.ndarray
    file_shape: tuple[int, int, int]
    internal_affine: np.ndarray

    def to_internal(self, volume_ijk: np.ndarray) -> np.ndarray:
        """[i, j, k, ...] in file order -> [z, y, x, ...] internal order (a view where possible)."""
        from nibabel.orientations import apply_orientation

        ras = apply_orientation(volume_ijk, self.transform)  # [x, y, z, ...]
        return np.swapaxes(ras, 0, 2)

    def to_file(self, volume_zyx: np.ndarray) -> np.ndarray:
        """Inverse of ``to_internal``: [z, y, x, ...] -> [i, j, k, ...] in the file's order."""
        from nibabel.orientations import apply_orientation, ornt_transform

        ras = np.swapaxes(volume_zyx, 0, 2)
        ras_ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        # The transform goes to RAS (the identity orientation), so it equals the file's own
        # orientation, and the way back is RAS -> that orientation.
        back = ornt_transform(ras_ornt, self.transform)
        return apply_orientation(ras, back)


@dataclass
class Scan:
    """A scan read from disk.

    data: float32 [C, Z, Y, X] in internal orientation (C = 1 for a 3D file, the 4th
    dimension otherwise). spacing_mm: (z, y, x) voxel size of ``data``. ``image`` keeps the
    original nibabel image (header, affine) as the template for outputs.
    """

    path: Path
    data: np.ndarray
    spacing_mm: tuple[float, float, float]
    reorientation: Reorientation
    image: "nib.Nifti1Image"

    @property
    def case_id(self) -> str:
        return case_id(self.path)

    @property
    def file_shape(self) -> tuple[int, int, int]:
        return self.reorientation.file_shape


def load_nifti(path: Path) -> "nib.Nifti1Image":
    """Open a NIfTI file with checks; the pixel data is read later (and checked then)."""
    return _load(Path(path))[0]


def _load(path: Path) -> tuple["nib.Nifti1Image", RawHeader]:
    """The image (voxels not read) and its checked raw header."""
    import nibabel as nib

    if not path.exists():
        raise InputNotFoundError(f"input '{path}' does not exist; expected a .nii/.nii.gz file or a folder of them.")
    if path.is_dir():
        raise InputNotFoundError(f"input '{path}' is a folder; expected a NIfTI file here.")
    require_regular_file(path)  # before any open(): opening a FIFO would block
    raw = read_raw_header(path)
    # nibabel logs header fixes on the root of its logger tree; our one-line errors and the
    # checks above say what matters, so keep its messages off the user's stderr.
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several unrelated types for bad headers
        detail = " ".join(str(exc).split())[:200]
        raise ImageFormatError(
            f"cannot read '{path}' as NIfTI ({type(exc).__name__}: {detail}); expected a valid "
            ".nii/.nii.gz file. Re-export the scan."
        ) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageFormatError(f"'{path}' is {type(image).__name__}; expected a NIfTI-1/2 image.")
    return image, raw


def _read_pixels(image: "nib.Nifti1Image", raw: RawHeader, path: Path) -> np.ndarray:
    """All voxels as float32 with the header's scaling applied; a truncated file fails here.

    A .nii.gz is decompressed in bounded chunks (never past what the header announces); a
    .nii is memory-mapped by nibabel. Not cached in the image (``caching="unchanged"``): the
    Scan keeps the image for its header, and a cached copy would sit beside the reoriented
    array (+420 MB at 512x512x400 for an LPS file)."""
    try:
        if raw.compressed:
            return read_gz_voxels(path, raw)
        return np.asarray(image.get_fdata(dtype=np.float32, caching="unchanged"))
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ImageFormatError(
            f"'{path}' is truncated or corrupt ({detail}); expected "
            f"{int(np.prod(image.shape))} voxels. Re-copy or re-export the file."
        ) from None


def check_header(path: Path) -> tuple[int, ...]:
    """Cheap checks of a scan without reading its voxels; returns the squeezed shape."""
    path = Path(path)
    return _spatial_checks(load_nifti(path), path)


def _spatial_checks(image: "nib.Nifti1Image", path: Path) -> tuple[int, ...]:
    shape = tuple(int(s) for s in image.shape)
    # Trailing singleton axes (e.g. [x, y, z, 1]) carry no information.
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise ImageShapeError(
            f"'{path}' is a {len(shape)}D image of shape {shape}; expected a 3D volume "
            "(or 4D with channels). Pass the whole volume, not a single slice."
        )
    if len(shape) > 4:
        raise ImageShapeError(
            f"'{path}' is a {len(shape)}D image of shape {shape}; expected 3D [x, y, z] or "
            "4D [x, y, z, channels]. Split it into 3D/4D files."
        )
    if min(shape) == 0:
        raise ImageShapeError(f"'{path}' has an empty axis (shape {shape}); expected every axis ≥ 1.")
    zooms = image.header.get_zooms()[:3]
    if not all(np.isfinite(z) and 0 < z < MAX_SPACING_MM for z in zooms):
        raise ImageValueError(
            f"'{path}' has voxel spacing {tuple(float(z) for z in zooms)} mm; expected positive "
            "finite spacings below 10 m. Fix the header (pixdim)."
        )
    from nibabel.orientations import io_orientation

    affine = image.affine
    if (not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12
            or np.isnan(io_orientation(affine)).any()):  # a voxel axis with no world direction
        raise ImageValueError(
            f"'{path}' has a non-invertible or non-finite affine; expected a valid voxel-to-world "
            "matrix. Fix the qform/sform of the file."
        )
    return shape


def read_scan(path: Path) -> Scan:
    """Read a 3D or 4D NIfTI into internal orientation, checking everything a user can get wrong."""
    path = Path(path)
    image, raw = _load(path)
    return _scan(image, raw, path)


def scan_from_image(image: "nib.Nifti1Image", path: Path) -> Scan:
    """A Scan of an in-memory NIfTI image (no file): the same header checks as a file's;
    ``path`` names it in messages."""
    from unisegcli.io.nifti_header import raw_header_in_memory

    return _scan(image, raw_header_in_memory(image, path), path)


def _scan(image: "nib.Nifti1Image", raw: RawHeader, path: Path) -> Scan:
    shape = _spatial_checks(image, path)
    try:
        return _to_scan(image, raw, shape, path)
    except MemoryError:
        raise HostMemoryError(
            f"not enough memory to read '{path}' ({'x'.join(map(str, raw.shape))} voxels of "
            f"{raw.dtype.name}, about {_reading_bytes(raw) / 1024**3:.3g} GiB while reading); expected a "
            "scan that fits in memory. Free memory, crop the scan, or "
            f"lower {MAX_VOXELS_ENV} to refuse such files before reading them."
        ) from None


def _reading_bytes(raw: RawHeader) -> int:
    """Peak memory of reading: the stored voxels, then two float32 copies (read, reoriented)."""
    return raw.data_bytes + 8 * (raw.data_bytes // raw.dtype.itemsize)


def _to_scan(image: "nib.Nifti1Image", raw: RawHeader, shape: tuple[int, ...], path: Path) -> Scan:
    """Read, check and reorient the voxels of a checked image."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    with np.errstate(over="ignore", invalid="ignore"):  # overflow shows as Inf, refused below
        pixels = _read_pixels(image, raw, path).reshape(shape)
    if not np.isfinite(pixels).all():
        bad = int(np.size(pixels) - np.count_nonzero(np.isfinite(pixels)))
        slope, inter = raw.header.get_slope_inter()
        scaled = f" after its scaling (scl_slope {slope:g}, scl_inter {inter or 0:g})" if slope is not None else ""
        raise ImageValueError(
            f"'{path}' has {bad} NaN/Inf voxels{scaled}; expected finite intensities. "
            "Replace them (e.g. with the background value) or fix scl_slope/scl_inter before segmenting."
        )
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt("RAS"))
    file_shape = tuple(int(s) for s in shape[:3])
    internal_affine = image.affine @ inv_ornt_aff(transform, file_shape) @ _swap_zx()
    reorientation = Reorientation(transform, file_shape, internal_affine)  # type: ignore[arg-type]
    internal = reorientation.to_internal(pixels)  # [z, y, x, C]
    data = np.ascontiguousarray(np.moveaxis(internal, -1, 0), dtype=np.float32)
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
    ras_zooms = np.empty(3)
    ras_zooms[transform[:, 0].astype(int)] = zooms
    spacing = (float(ras_zooms[2]), float(ras_zooms[1]), float(ras_zooms[0]))
    return Scan(path=path, data=data, spacing_mm=spacing, reorientation=reorientation, image=image)


def _swap_zx() -> np.ndarray:
    """Voxel affine mapping internal (z, y, x) indices to RAS-ordered (x, y, z) indices."""
    swap = np.zeros((4, 4))
    swap[0, 2] = swap[1, 1] = swap[2, 0] = swap[3, 3] = 1.0
    return swap


def label_image(volume_ijk: np.ndarray, template: "nib.Nifti1Image") -> "nib.Nifti1Image":
    """A uint8 image with the template's exact affine, qform/sform (and codes) and zooms.

    volume_ijk: [i, j, k] in the template's file voxel order.
    """
    import nibabel as nib

    if tuple(volume_ijk.shape) != tuple(template.shape[:3]):
        raise ValueError(f"label volume {volume_ijk.shape} does not match template {template.shape[:3]}")
    header = template.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(volume_ijk.shape)
    header.set_zooms(template.header.get_zooms()[:3])
    header["scl_slope"] = 1.0
    header["scl_inter"] = 0.0
    cls = type(template) if isinstance(template, (nib.Nifti1Image, nib.Nifti2Image)) else nib.Nifti1Image
    # affine=None keeps the header's own qform (quaternion) and sform fields and codes
    # byte for byte; passing the affine would re-derive them and round the quaternion.
    out = cls(np.asarray(volume_ijk, dtype=np.uint8), None, header=header)
    return out


def write_atomic(image: "nib.Nifti1Image", path: Path) -> Path:
    """Save an image under ``path`` without ever leaving a partial file there."""
    import nibabel as nib

    path = Path(path)
    check_output_dir(path.parent)
    with staged_files(path.parent) as stage:
        nib.save(image, str(stage(path.name)))
    return path


def write_labels(volume_zyx: np.ndarray, scan: Scan, path: Path) -> Path:
    """Write an internal-orientation label map [Z, Y, X] in the scan's original geometry."""
    volume_ijk = scan.reorientation.to_file(volume_zyx)
    return write_atomic(label_image(volume_ijk, scan.image), path)


def check_output_dir(folder: Path, create: bool = True) -> Path:
    """Make sure ``folder`` is (or can become) a writable folder; raise OutputError if not."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"output '{folder}' is a file; expected a folder for the masks. Pass another -o path."
        )
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=WRITE_PROBE_PREFIX, delete=True)
        probe.close()
    except OSError as exc:
        raise OutputError(
            f"output folder '{folder}' is not writable ({exc.strerror or exc}); expected a folder "
            "you can write to. Pass another -o path or fix its permissions."
        ) from exc
    return folder


def header_summary(image: "nib.Nifti1Image") -> dict[str, Any]:
    """Shape, zooms and orientation codes: safe to log (no patient data in NIfTI headers we read)."""
    import nibabel as nib

    return {
        "shape": tuple(int(s) for s in image.shape),
        "zooms_mm": tuple(round(float(z), 4) for z in image.header.get_zooms()[:3]),
        "orientation": "".join(nib.aff2axcodes(image.affine)),
    }
