"""Per-structure statistics of a case: volume, intensities, position, components.

Coordinate conventions (also written into ``statistics.json`` under "conventions"):

- World coordinates are millimetres in the NIfTI/nibabel world, RAS+ (x grows towards the
  patient's right, y anterior, z superior). DICOM's LPS coordinates are (-x, -y, z).
- Voxel boxes (``bbox_ijk``) are 0-based, inclusive indices in the FILE's voxel order
  (i, j, k) — the order the input is stored in and viewers show — not our internal (z, y, x).
  For DICOM inputs i = column, j = row, k = slice index along the slice normal.
- ``bbox_world_mm`` is the world-axis-aligned box around the centres of the corner voxels of
  the voxel box (exact for axis-aligned scans; encloses the structure's voxel centres for
  oblique ones).
- Intensities are the original image values (HU for CT) inside the mask, per channel; std is
  the population standard deviation (ddof = 0); percentiles use numpy's linear method.
- An empty structure has voxel_count 0, volume_ml 0.0, components 0 and null
  (JSON) / empty (CSV) positions and intensities — never NaN.
- Each structure has a "qc" object of flags (``outputs.qc``: empty, touches_edge,
  volume_outside_range, fragmented, laterality) and the case a "flagged" summary
  (structure -> raised flag names); the CSV has them as ``qc_*`` columns and ``flags``.

``statistics.json`` and ``statistics.csv`` hold the same numbers (the CSV is the JSON
flattened, one row per structure, floats written with full precision). A cohort table
``OUT/statistics.csv`` (one row per case × structure) is merged under a file lock so several
processes can write into one output folder; ``OUT/qc.csv`` beside it lists the flagged
structures of every case (``merge_cohort_qc``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from unisegcli.errors import OutputError
from unisegcli.io.atomic import staged_files
from unisegcli.outputs.qc import FRAGMENT_MAX_PIECES, QC_CONVENTIONS, add_case_flags, counting_pieces, edge_faces
from unisegcli.postprocessing.components import component_sizes

if TYPE_CHECKING:
    from unisegcli.io.nifti import Scan

SCHEMA_VERSION = 1
INTENSITY_KEYS = ("mean", "std", "min", "max", "median", "p5", "p95")
CONVENTIONS = {
    "world": "mm, NIfTI/nibabel RAS+ world (x = right, y = anterior, z = superior); DICOM LPS = (-x, -y, z)",
    "bbox_ijk": "0-based inclusive voxel indices in the input file's voxel order (i, j, k), as viewers show",
    "bbox_world_mm": "world-axis-aligned box around the corner voxel centres of bbox_ijk",
    "intensity": "original image values inside the mask per channel; std with ddof=0; linear percentiles",
    "connectivity": "26-connected components",
    "qc": QC_CONVENTIONS,
}
_BASE_COLUMNS = (
    "case_id", "structure", "task", "voxel_count", "volume_ml", "components", "largest_component_ml",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "bbox_i_min", "bbox_j_min", "bbox_k_min", "bbox_i_max", "bbox_j_max", "bbox_k_max",
    "bbox_x_min_mm", "bbox_y_min_mm", "bbox_z_min_mm", "bbox_x_max_mm", "bbox_y_max_mm", "bbox_z_max_mm",
    "qc_empty", "qc_touches_edge", "qc_volume_outside_range", "qc_fragmented", "qc_laterality", "flags",
)  # fmt: skip
QC_COLUMNS = (
    "case_id", "structure", "task", "flags", "volume_ml", "reference_min_ml", "reference_max_ml",
    "touches_edge", "components", "centroid_x_mm", "reference_source",
)  # fmt: skip


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml (1 ml = 1000 mm³) from a voxel-to-world affine."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def default_channel_names(count: int) -> tuple[str, ...]:
    """Names used when the caller does not know the channels: "image" or "channel0".."""
    return ("image",) if count == 1 else tuple(f"channel{c}" for c in range(count))


def structure_statistics(
    mask_zyx: np.ndarray,
    image_czyx: np.ndarray,
    internal_affine: np.ndarray,
    file_from_internal: np.ndarray,
    channel_names: Sequence[str],
) -> dict[str, Any]:
    """Statistics of one structure (JSON-ready: only ints, floats, None, lists, dicts).

    mask_zyx: bool [Z, Y, X] internal order. image_czyx: float [C, Z, Y, X] original values.
    internal_affine: internal (z, y, x) voxel -> world mm (RAS). file_from_internal: integer
    4x4 mapping internal (z, y, x) indices to the file's (i, j, k) indices.
    """
    mask = np.asarray(mask_zyx, dtype=bool)
    det_mm3 = abs(float(np.linalg.det(internal_affine[:3, :3])))
    empty_intensity = {name: dict.fromkeys(INTENSITY_KEYS) for name in channel_names}
    # Crop to the bounding box first: every later step then only touches the structure.
    profiles = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(p.size == 0 for p in profiles):
        return {
            "voxel_count": 0, "volume_ml": 0.0, "components": 0, "largest_component_ml": 0.0,
            "centroid_world_mm": None, "bbox_ijk": None, "bbox_world_mm": None,
            "intensity": empty_intensity, "qc": {"empty": True, "touches_edge": [], "fragmented": False},
        }  # fmt: skip
    lo = np.array([p[0] for p in profiles])
    hi = np.array([p[-1] for p in profiles])
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo, hi))
    crop = mask[box]
    idx = np.nonzero(crop)
    count = int(idx[0].size)
    centroid_zyx = np.array([i.mean(dtype=np.float64) for i in idx]) + lo
    centroid = (internal_affine @ np.append(centroid_zyx, 1.0))[:3]
    corners = np.array([[*corner, 1.0] for corner in itertools.product(*zip(lo, hi))])  # [8, 4]
    world_corners = (internal_affine @ corners.T)[:3]
    file_corners = np.rint(file_from_internal @ corners.T)[:3].astype(int)
    sizes = component_sizes(crop)
    intensity: dict[str, dict[str, float | None]] = {}
    for c, name in enumerate(channel_names):
        values = np.asarray(image_czyx[c][box][crop], dtype=np.float64)
        p5, p95 = np.percentile(values, [5.0, 95.0])
        intensity[name] = {
            "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "median": float(np.median(values)), "p5": float(p5), "p95": float(p95),
        }  # fmt: skip
    return {
        "voxel_count": count,
        "volume_ml": count * det_mm3 / 1000.0,
        "components": int(sizes.size),
        "largest_component_ml": int(sizes[0]) * det_mm3 / 1000.0,
        "centroid_world_mm": [float(v) for v in centroid],
        "bbox_ijk": {"min": file_corners.min(axis=1).tolist(), "max": file_corners.max(axis=1).tolist()},
        "bbox_world_mm": {
            "min": [float(v) for v in world_corners.min(axis=1)],
            "max": [float(v) for v in world_corners.max(axis=1)],
        },
        "intensity": intensity,
        "qc": {
            "empty": False,
            "touches_edge": edge_faces(lo.tolist(), hi.tolist(), mask.shape),
            "fragmented": counting_pieces(sizes) > FRAGMENT_MAX_PIECES,
        },
    }


def file_from_internal_matrix(scan: "Scan") -> np.ndarray:
    """Integer 4x4 matrix taking internal (z, y, x) indices to the file's (i, j, k) indices."""
    matrix = np.linalg.inv(scan.image.affine) @ scan.reorientation.internal_affine
    rounded = np.rint(matrix)
    # Reorientation only permutes and flips axes, so the product is integer up to rounding.
    if not np.allclose(matrix, rounded, atol=1e-3):
        raise ValueError("internal and file voxel grids differ by more than a permutation/flip")
    return rounded


def case_statistics(
    scan: "Scan",
    masks_zyx: Mapping[str, np.ndarray],
    *,
    case_id: str | None = None,
    task_of: Mapping[str, str] | None = None,
    channel_names: Sequence[str] | None = None,
    reference_ranges: Mapping[str, Mapping[str, Any]] | None = None,
    model_of: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Statistics of every structure of a case, as the ``statistics.json`` document.

    masks_zyx: structure -> bool [Z, Y, X] in the scan's internal orientation (the masks as
    written, after cleanup). channel_names: one name per channel of ``scan.data`` [C, Z, Y, X]
    (default "image" / "channel0"..). reference_ranges: structure -> {"min", "max", "source"}
    volume ranges in ml for the ``volume_outside_range`` flag (default: the registry's).
    model_of: structure -> the model that made it, for runs of several models (each structure
    then has a "model" after its "task"; ``unisegcli.combination``).
    """
    channels = tuple(channel_names) if channel_names else default_channel_names(scan.data.shape[0])
    if len(channels) != scan.data.shape[0]:
        raise ValueError(f"{len(channels)} channel names for {scan.data.shape[0]} channels")
    affine = scan.reorientation.internal_affine
    file_from_internal = file_from_internal_matrix(scan)
    task_of = task_of or {}
    structures = {}
    for name, mask in masks_zyx.items():
        if tuple(mask.shape) != tuple(scan.data.shape[1:]):
            raise ValueError(f"mask '{name}' has shape {mask.shape}, scan is {scan.data.shape[1:]}")
        record = {"task": task_of.get(name)}
        if model_of is not None:
            record["model"] = model_of.get(name)
        record.update(structure_statistics(mask, scan.data, affine, file_from_internal, channels))
        structures[name] = record
    statistics = {
        "schema_version": SCHEMA_VERSION,
        "case_id": case_id if case_id is not None else scan.case_id,
        "conventions": CONVENTIONS,
        "file_shape_ijk": list(scan.file_shape),
        "voxel_volume_ml": voxel_volume_ml(affine),
        "channels": list(channels),
        "structures": structures,
    }
    centre = affine @ np.append((np.asarray(scan.data.shape[1:], dtype=float) - 1.0) / 2.0, 1.0)
    return add_case_flags(statistics, float(centre[0]), reference_ranges)


def flatten_rows(statistics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One flat row per structure (column -> int/float/str/None), in ``csv_columns`` order."""
    rows = []
    for name, rec in statistics["structures"].items():
        row: dict[str, Any] = {
            "case_id": statistics["case_id"], "structure": name, "task": rec["task"],
            **({"model": rec["model"]} if "model" in rec else {}),
            "voxel_count": rec["voxel_count"], "volume_ml": rec["volume_ml"],
            "components": rec["components"], "largest_component_ml": rec["largest_component_ml"],
        }  # fmt: skip
        centroid = rec["centroid_world_mm"] or [None] * 3
        row.update(zip(("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"), centroid))
        for end in ("min", "max"):
            ijk = rec["bbox_ijk"][end] if rec["bbox_ijk"] else [None] * 3
            row.update({f"bbox_{a}_{end}": v for a, v in zip("ijk", ijk)})
            xyz = rec["bbox_world_mm"][end] if rec["bbox_world_mm"] else [None] * 3
            row.update({f"bbox_{a}_{end}_mm": v for a, v in zip("xyz", xyz)})
        qc = rec["qc"]
        row.update({f"qc_{flag}": qc.get(flag) for flag in ("empty", "volume_outside_range", "fragmented", "laterality")})
        row["qc_touches_edge"] = ";".join(qc["touches_edge"])
        row["flags"] = ";".join(statistics.get("flagged", {}).get(name, []))
        for channel, values in rec["intensity"].items():
            row.update({f"intensity_{channel}_{key}": values[key] for key in INTENSITY_KEYS})
        rows.append(row)
    return rows


def csv_columns(channels: Iterable[str], *, with_model: bool = False) -> list[str]:
    """The CSV header for these channel names; with_model: a "model" column after "task"
    (runs of several models)."""
    base = list(_BASE_COLUMNS)
    if with_model:
        base.insert(base.index("task") + 1, "model")
    return base + [f"intensity_{c}_{k}" for c in channels for k in INTENSITY_KEYS]


def _has_models(statistics: Mapping[str, Any]) -> bool:
    return any("model" in rec for rec in statistics["structures"].values())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float (JSON does the same)
    return str(value)


def _csv_text(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def render_statistics(statistics: Mapping[str, Any]) -> tuple[str, str]:
    """(statistics.json text, statistics.csv text) for a ``case_statistics`` document.

    json.dumps uses allow_nan=False: a NaN would be a bug and fails here, never in a reader.
    """
    json_text = json.dumps(statistics, indent=2, allow_nan=False) + "\n"
    columns = csv_columns(statistics["channels"], with_model=_has_models(statistics))
    csv_text = _csv_text(columns, flatten_rows(statistics))
    return json_text, csv_text


def write_statistics(statistics: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write ``statistics.json`` and ``statistics.csv`` into ``folder`` together, atomically."""
    from unisegcli.io.nifti import check_output_dir

    folder = check_output_dir(Path(folder))
    json_text, csv_text = render_statistics(statistics)
    with staged_files(folder) as stage:
        stage("statistics.json").write_text(json_text, encoding="utf-8")
        stage("statistics.csv").write_text(csv_text, encoding="utf-8")
    return folder / "statistics.json", folder / "statistics.csv"


def merge_cohort_statistics(
    cohort_csv: Path, statistics: Mapping[str, Any], *, lock_timeout_s: float = 600.0
) -> Path:
    """Put one case's rows into the cohort table ``cohort_csv`` (one row per case × structure).

    Rows of the same case_id already in the table are replaced (a re-run case appears once);
    other cases are kept. Columns are the union of both headers (cases may have different
    channels). Rows are sorted by case_id so the table does not depend on which process
    finished first. A file lock next to the table serialises concurrent writers; the table is
    replaced atomically, so readers never see half a file.
    """
    rows = flatten_rows(statistics)
    return _merge_case_rows(Path(cohort_csv), str(statistics["case_id"]), rows,
                            csv_columns(statistics["channels"], with_model=_has_models(statistics)),
                            "statistics", lock_timeout_s)


def qc_rows(statistics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per flagged structure of a case (``QC_COLUMNS``); none when nothing is flagged."""
    rows = []
    for name, raised in statistics.get("flagged", {}).items():
        rec = statistics["structures"][name]
        reference = rec["qc"].get("reference_volume_ml") or {}
        centroid = rec["centroid_world_mm"] or [None]
        rows.append({
            "case_id": statistics["case_id"], "structure": name, "task": rec["task"],
            **({"model": rec["model"]} if "model" in rec else {}), "flags": ";".join(raised),
            "volume_ml": rec["volume_ml"], "reference_min_ml": reference.get("min"),
            "reference_max_ml": reference.get("max"), "touches_edge": ";".join(rec["qc"]["touches_edge"]),
            "components": rec["components"], "centroid_x_mm": centroid[0],
            "reference_source": reference.get("source"),
        })  # fmt: skip
    return rows


def merge_cohort_qc(folder: Path, statistics: Mapping[str, Any], *, lock_timeout_s: float = 600.0) -> Path:
    """Put one case's flagged structures into ``folder/qc.csv`` (one row per case × flagged
    structure); the case's earlier rows are replaced, so a re-run case that is no longer
    flagged disappears. The table exists (header only) once any case was merged. Same
    locking and atomic replacement as ``merge_cohort_statistics``."""
    columns = list(QC_COLUMNS)
    if _has_models(statistics):
        columns.insert(columns.index("task") + 1, "model")
    return _merge_case_rows(Path(folder) / "qc.csv", str(statistics["case_id"]), qc_rows(statistics),
                            columns, "qc", lock_timeout_s)


def merge_cohort_rows(table: Path, case_id: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                      kind: str, *, lock_timeout_s: float = 600.0) -> Path:
    """Replace ``case_id``'s rows of another cohort CSV (e.g. ``OUT/compare.csv``) by ``rows``,
    with the same locking and atomic replacement as ``merge_cohort_statistics``. columns must
    hold "case_id" and "structure"."""
    return _merge_case_rows(Path(table), case_id, rows, columns, kind, lock_timeout_s)


def _merge_case_rows(table: Path, case_id: str, rows: Sequence[Mapping[str, Any]],
                     new_columns: Sequence[str], kind: str, lock_timeout_s: float) -> Path:
    """Replace ``case_id``'s rows of a cohort CSV by ``rows``, under a file lock, atomically."""
    from filelock import FileLock, Timeout

    new_rows = [{k: _cell(v) for k, v in row.items()} for row in rows]
    lock = FileLock(str(table.parent / f".{table.name}.lock"), timeout=lock_timeout_s)
    try:
        with lock:
            columns: list[str] = []
            kept: list[dict[str, str]] = []
            if table.exists():
                with table.open(newline="", encoding="utf-8") as fh:
                    reader = csv.DictReader(fh)
                    columns = list(reader.fieldnames or [])
                    if "case_id" not in columns or "structure" not in columns:
                        raise OutputError(
                            f"'{table}' exists but is not a uniseg {kind} table (no "
                            "case_id/structure columns); expected to merge into one. Move it away "
                            "or choose another -o folder."
                        )
                    kept = [row for row in reader if row.get("case_id") != case_id]
            columns += [c for c in new_columns if c not in columns]
            merged = sorted(kept + new_rows, key=lambda r: r.get("case_id") or "")
            text = _csv_text(columns, merged)
            with staged_files(table.parent) as stage:
                stage(table.name).write_text(text, encoding="utf-8")
    except Timeout as exc:
        raise OutputError(
            f"cannot lock '{table}' within {lock_timeout_s:.0f} s (another uniseg process "
            f"holds it); expected to merge this case's {kind} rows. Retry, or remove a stale "
            f"'.{table.name}.lock' if no other run is active."
        ) from exc
    except OSError as exc:
        raise OutputError(
            f"cannot update '{table}': {exc.strerror or exc}; expected a writable output "
            "folder. Fix permissions or free disk space."
        ) from exc
    return table
