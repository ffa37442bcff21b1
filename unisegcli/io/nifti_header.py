"""The raw NIfTI header, checked before any voxel is read, and a bounded reader for .nii.gz.

Everything a file can claim is checked from its first bytes, before nibabel allocates
anything: the header size and magic, the number and sign of the dimensions, the data type
(greyscale numbers only: no complex, RGB or 128-bit floats), the raw voxel sizes (nibabel
silently turns 0 into 1 when the qform and sform codes are 0), where the data starts, and
the voxel budget: ``UNISEG_MAX_VOXELS`` (default 2**31 voxels, about 8 GiB as float32)
bounds the voxel count a file may claim, and so the memory reading it can take.

A .nii.gz is decompressed in chunks and never beyond what its header announces: a stream
that ends early is truncated, one that goes on after the last voxel is refused without
being decompressed further (a gzip bomb cannot expand past the budget).
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from unisegcli.errors import ImageFormatError, ImageShapeError, ImageValueError, InputError

MAX_VOXELS_ENV = "UNISEG_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 2**31
MAX_SPACING_MM = 1e4
MIN_SPACING_MM = 1e-3  # 1 µm: far below any CT/MR/PET voxel, far above a zeroed float
GZIP_CHUNK_BYTES = 8 * 1024**2
_HEADER_SIZES = {348: "NIfTI-1", 540: "NIfTI-2"}
_MAGIC = {348: b"n+1", 540: b"n+2"}
_SUPPORTED_DTYPES = {2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280}  # (u)int8..64, float32/64
_REFUSED_DTYPES = {
    0: "no data type (code 0)", 1: "1-bit binary", 32: "complex64", 128: "RGB24 colour",
    1536: "float128", 1792: "complex128", 2048: "complex256", 2304: "RGBA32 colour",
}
_FIX = "Re-export the scan as a 3D/4D greyscale NIfTI (e.g. with dcm2niix or nibabel)."


@dataclass(frozen=True)
class RawHeader:
    """What the header of a NIfTI file claims, already checked.

    shape: the dimensions dim[1..dim[0]] in file order; dtype: the stored numpy dtype (with
    the file's byte order); vox_offset: where the voxels start in the (decompressed) file;
    data_bytes: shape x bytes per voxel; compressed: a gzip file.
    """

    header: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    vox_offset: int
    data_bytes: int
    compressed: bool


def max_voxels() -> int:
    """The voxel budget: ``$UNISEG_MAX_VOXELS`` (a positive integer) or 2**31."""
    from unisegcli.errors import UsageError

    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(raw)) if "e" in raw.lower() else int(raw)
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise UsageError(
            f"{MAX_VOXELS_ENV}={raw!r} is not a positive whole number; expected a voxel count such "
            f"as {DEFAULT_MAX_VOXELS} (the default). Fix or unset the variable."
        )
    return value


def require_regular_file(path: Path, what: str = "input") -> os.stat_result:
    """Refuse FIFOs, sockets and devices before anything opens them (opening a FIFO blocks)."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ImageFormatError(
            f"cannot read {what} '{path}': {exc.strerror or exc}; expected a readable scan file. "
            "Check the path and its permissions."
        ) from exc
    if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a regular file")
        raise InputError(
            f"{what} '{path}' is {kind}; expected a regular .nii/.nii.gz file, a DICOM folder or a "
            ".zip. Save the stream to a file first and pass that file."
        )
    return info


def _opener(path: Path) -> tuple[Callable[..., Any], bool]:
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    return (gzip.open if compressed else open), compressed


def _read_head(path: Path) -> tuple[bytes, bool]:
    try:
        opener, compressed = _opener(path)
        with opener(path, "rb") as fh:
            return fh.read(540), compressed
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageFormatError(
            f"cannot read '{path}': {exc}; expected a NIfTI file (.nii or .nii.gz). "
            "Check that the file is complete (re-copy or re-export it)."
        ) from exc


def _parse(path: Path, head: bytes) -> tuple[Any, int]:
    """The nibabel header object of the first bytes, and its size (348 or 540)."""
    import nibabel as nib

    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")} if len(head) >= 4 else set()
    size = next((s for s in _HEADER_SIZES if s in sizes), None)
    if size is None:
        what = "an empty file" if not head else "not a NIfTI file"
        raise ImageFormatError(
            f"'{path}' is {what}; expected a NIfTI image (.nii or .nii.gz). "
            "Convert DICOM or other formats to NIfTI first, or pass a DICOM folder."
        )
    if len(head) < size:
        raise ImageFormatError(
            f"'{path}' ends after {len(head)} bytes, inside its {_HEADER_SIZES[size]} header of {size} "
            "bytes; expected a complete file. Re-copy or re-export it."
        )
    header_class = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    try:
        header = header_class.from_fileobj(io.BytesIO(head[:size]), check=False)
        magic = bytes(header["magic"]).rstrip(b"\0")[:3]
    except Exception as exc:  # nibabel raises several types for garbage headers
        raise ImageFormatError(f"cannot parse the header of '{path}' ({type(exc).__name__}); {_FIX}") from None
    if magic != _MAGIC[size]:
        shown = magic.decode("ascii", "replace").encode("unicode_escape").decode()
        raise ImageFormatError(
            f"'{path}' has the NIfTI magic '{shown}'; expected '{_MAGIC[size].decode()}' (a single-file "
            f"{_HEADER_SIZES[size]}; '.hdr/.img' pairs are not read). {_FIX}"
        )
    return header, size


def _check_dims(path: Path, header: Any) -> tuple[int, ...]:
    dim = [int(v) for v in header["dim"]]
    if not 1 <= dim[0] <= 7:
        raise ImageShapeError(
            f"'{path}' claims {dim[0]} dimensions in its header (dim[0]); expected 1 to 7 (3 for a "
            f"volume, 4 with channels). {_FIX}"
        )
    shape = tuple(dim[1 : 1 + dim[0]])
    if min(shape) < 0:
        raise ImageShapeError(f"'{path}' has a negative size in its header (dim {shape}); expected sizes ≥ 1. {_FIX}")
    return shape


def _check_dtype(path: Path, header: Any) -> np.dtype:
    code = int(header["datatype"])
    if code not in _SUPPORTED_DTYPES:
        what = _REFUSED_DTYPES.get(code, f"an unknown data type (code {code})")
        hint = " Keep the magnitude (abs) as a real image." if "complex" in what else ""
        raise ImageFormatError(
            f"'{path}' stores {what} voxels; expected greyscale integers or float32/float64.{hint} {_FIX}"
        )
    return np.dtype(header.get_data_dtype())


def _check_spacing(path: Path, header: Any, ndim: int) -> None:
    spacing = [float(v) for v in header["pixdim"][1 : 1 + min(ndim, 3)]]
    if not all(np.isfinite(v) and MIN_SPACING_MM <= v < MAX_SPACING_MM for v in spacing):
        raise ImageValueError(
            f"'{path}' has voxel spacing {tuple(spacing)} mm in its header (pixdim); expected positive "
            f"finite spacings from {MIN_SPACING_MM:g} mm to {MAX_SPACING_MM / 1000:g} m. Fix the header "
            "(pixdim) of the file, e.g. re-export it from the scanner or PACS."
        )


def _check_scaling_and_quaternion(path: Path, header: Any) -> None:
    """What nibabel would reject with a bare message: an intercept without a finite value next
    to a used slope, and a qform quaternion that is not a rotation (b² + c² + d² > 1)."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if np.isfinite(slope) and slope != 0 and not np.isfinite(inter):
        raise ImageValueError(
            f"'{path}' has intensity scaling scl_slope {slope:g} with scl_inter {inter:g}; expected a "
            "finite intercept. Fix the header (scl_inter = 0) or re-export the scan."
        )
    if int(header["qform_code"]) > 0:
        quaternion = np.array([float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d")])
        if not np.all(np.isfinite(quaternion)) or quaternion @ quaternion > 1 + 3 * np.finfo(np.float32).eps:
            raise ImageValueError(
                f"'{path}' has a qform quaternion (b, c, d) = {tuple(round(float(q), 4) for q in quaternion)} "
                "that is not a rotation (b² + c² + d² must be ≤ 1); expected a valid qform. Set qform_code "
                "to 0 or re-export the scan."
            )


def _check_budget(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    voxels = int(np.prod([max(s, 0) for s in shape], dtype=object))
    budget = max_voxels()
    if voxels > budget:
        size = "x".join(str(s) for s in shape)
        raise ImageShapeError(
            f"'{path}' claims {size} = {voxels:,} voxels ({voxels * dtype.itemsize / 1024**3:.3g} GiB of "
            f"{dtype.name}); expected at most {budget:,} ({MAX_VOXELS_ENV}). A damaged header, or a "
            f"scan too large to segment: crop or resample it, or raise {MAX_VOXELS_ENV}."
        )
    return voxels * dtype.itemsize


def read_raw_header(path: Path) -> RawHeader:
    """Check the header of a NIfTI file (regular file, not yet opened) without reading voxels."""
    head, compressed = _read_head(path)
    header, size = _parse(path, head)
    shape = _check_dims(path, header)
    dtype = _check_dtype(path, header)
    _check_spacing(path, header, len(shape))
    data_bytes = _check_budget(path, shape, dtype)
    offset = float(header["vox_offset"])
    if not np.isfinite(offset) or not size <= offset < 2**62:
        raise ImageFormatError(
            f"'{path}' says its voxels start at byte {offset:g} (vox_offset); expected a position "
            f"after the {size}-byte header. {_FIX}"
        )
    _check_scaling_and_quaternion(path, header)
    raw = RawHeader(header, shape, dtype, int(offset), data_bytes, compressed)
    if not compressed:
        _check_file_size(path, raw)
    return raw


def raw_header_in_memory(image: Any, label: Path) -> RawHeader:
    """The same header checks for an image that has no file (``Segmenter.predict`` of a nibabel
    image or an array): its header block, as it would be written, checked like a file's."""
    header, _ = _parse(label, bytes(image.header.binaryblock))
    shape = _check_dims(label, header)
    dtype = _check_dtype(label, header)
    _check_spacing(label, header, len(shape))
    data_bytes = _check_budget(label, shape, dtype)
    _check_scaling_and_quaternion(label, header)
    return RawHeader(header, shape, dtype, 0, data_bytes, False)


def _check_file_size(path: Path, raw: RawHeader) -> None:
    actual = path.stat().st_size
    if actual < raw.vox_offset + raw.data_bytes:
        raise ImageFormatError(
            f"'{path}' is {actual} bytes but its header needs {raw.vox_offset + raw.data_bytes} "
            f"({raw.data_bytes} bytes of voxels from byte {raw.vox_offset}); the file is truncated "
            "or its header is wrong. Re-copy or re-export the file."
        )


class _Chunks(io.RawIOBase):
    """A read-once file over decompressed chunks; each chunk is dropped once copied out."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks, self._pos = chunks, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if (offset, whence) != (0, 0) or self._pos:
            raise io.UnsupportedOperation("the voxel stream is read once, from its start")
        return 0

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view, filled = memoryview(buffer).cast("B"), 0
        while self._chunks and filled < len(view):
            chunk = self._chunks[0]
            take = min(len(chunk), len(view) - filled)
            view[filled : filled + take] = chunk[:take]
            filled += take
            if take == len(chunk):
                self._chunks.pop(0)
            else:
                self._chunks[0] = chunk[take:]
        self._pos += filled
        return filled


def _decompress_voxels(path: Path, raw: RawHeader) -> list[bytes]:
    """The voxel bytes of a .nii.gz, in chunks; never more than the header announces."""
    chunks: list[bytes] = []
    try:
        with gzip.open(path, "rb") as fh:
            fh.seek(raw.vox_offset)
            remaining = raw.data_bytes
            while remaining:
                chunk = fh.read(min(GZIP_CHUNK_BYTES, remaining))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            extra = len(fh.read(GZIP_CHUNK_BYTES)) if not remaining else 0
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageFormatError(
            f"'{path}' is truncated or corrupt ({exc}); expected {raw.data_bytes} bytes of voxels. "
            "Re-copy or re-export the file."
        ) from exc
    if remaining:
        raise ImageFormatError(
            f"'{path}' is truncated or corrupt: it holds {raw.data_bytes - remaining} of the "
            f"{raw.data_bytes} bytes of voxels its header announces. Re-copy or re-export the file."
        )
    if extra:
        raise ImageFormatError(
            f"'{path}' decompresses to more data than its header announces ({raw.data_bytes} bytes of "
            f"voxels from byte {raw.vox_offset}); expected a file that matches its header (a damaged "
            "header, or a gzip bomb). Nothing more was decompressed. Re-export the scan."
        )
    return chunks


def read_gz_voxels(path: Path, raw: RawHeader) -> np.ndarray:
    """All voxels of a .nii.gz as float32 [file shape], scaled exactly as nibabel's get_fdata."""
    from nibabel.arrayproxy import ArrayProxy

    slope, inter = raw.header.get_slope_inter()
    spec = (raw.shape, raw.dtype, 0, 1.0 if slope is None else slope, 0.0 if inter is None else inter)
    proxy = ArrayProxy(_Chunks(_decompress_voxels(path, raw)), spec, mmap=False)
    return np.asarray(proxy, dtype=np.float32)

