"""Which folders of a DICOM tree are cases: one per study.

``uniseg cohort/ -o out`` with ``cohort/<patient>/<study>/<series>/*.dcm`` runs one case per
study, and ``io.dicom_select`` then takes one series of each study. A case is the largest
folder whose DICOM files all belong to one study (StudyInstanceUID; an empty or missing one
counts as a study of its own): a folder below which two studies lie is split into its
subfolders. A folder that itself holds DICOM files is one case whatever lies below it (its
files cannot be told apart by folder). One header is read per folder that holds DICOM files
(the first by name, up to the study UID only), so discovery stays cheap.
"""

from __future__ import annotations

from pathlib import Path

_PROBE_FILES = 64  # files tried per folder for one with a DICOM preamble


def _entries(folder: Path) -> list[Path]:
    """The folder's visible entries, sorted; none when it cannot be listed (no permission):
    as ``Path.rglob`` does, such a folder is passed over."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def _first_dicom_file(entries: list[Path]) -> Path | None:
    from unisegcli.io.dicom import _has_dicm_preamble

    files = [p for p in entries if p.is_file() and p.name.upper() != "DICOMDIR"
             and not p.name.lower().endswith((".nii", ".nii.gz"))]
    return next((p for p in files[:_PROBE_FILES] if _has_dicm_preamble(p)), None)


def _study_uid(path: Path) -> str:
    import pydicom

    from unisegcli.io.dicom_privacy import quiet_pydicom

    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # unreadable: the reader reports it; here it is just "some study"
            return ""
    return str(ds.get("StudyInstanceUID", "") or "")


def _studies(folder: Path, found: dict[Path, set[str]], direct: set[Path]) -> set[str]:
    """Study UIDs below ``folder`` (recorded per folder in ``found``; folders that hold DICOM
    files themselves in ``direct``)."""
    studies: set[str] = set()
    entries = _entries(folder)
    first = _first_dicom_file(entries)
    if first is not None:
        studies.add(_study_uid(first))
        direct.add(folder)
    # Links are not followed: a link loop would never end, and a case is a real folder.
    for child in (p for p in entries if p.is_dir() and not p.is_symlink()):
        studies |= _studies(child, found, direct)
    found[folder] = studies
    return studies


def study_folders(folder: Path) -> list[Path]:
    """The case folders of the DICOM tree ``folder`` (sorted); [] when it holds no DICOM file.

    Without pydicom (the ``dicom`` extra) the folder is one case; reading it then says how
    to install the extra.
    """
    from unisegcli.io.dicom import is_dicom_input

    try:
        import pydicom  # noqa: F401
    except ImportError:
        return [folder] if is_dicom_input(folder) else []
    found: dict[Path, set[str]] = {}
    direct: set[Path] = set()
    _studies(folder, found, direct)

    def split(current: Path) -> list[Path]:
        if not found.get(current):
            return []
        if len(found[current]) == 1 or current in direct:
            return [current]
        return [case for child in sorted(c for c in found if c.parent == current) for case in split(child)]

    return split(folder)


def case_ids(folders: list[Path], root: Path) -> list[str]:
    """A case id per study folder: its path below ``root`` with '/' as '_' (``p1``,
    ``p2_CT``, ``p2_CT2``: unique, and it names the patient folder); ``root``'s own name
    when the root is the study."""
    return ["_".join(f.relative_to(root).parts) or root.name for f in folders]
