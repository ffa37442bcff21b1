"""Turn what the user typed (files, folders) into a sorted list of scans with case ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from unisegcli.errors import InputNotFoundError, UsageError
from unisegcli.io.nifti import case_id, is_nifti_name


@dataclass(frozen=True)
class CaseInput:
    """One case to segment: its id (file name without .nii/.nii.gz) and its file."""

    case_id: str
    path: Path


def discover(inputs: Iterable[Path]) -> list[CaseInput]:
    """Files as given, folders searched recursively for NIfTI files; sorted by case id.

    Raises InputNotFoundError for a missing path or a folder without scans and UsageError
    for two inputs that would write to the same case folder.
    """
    cases: list[CaseInput] = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise InputNotFoundError(
                f"input '{raw}' does not exist; expected a .nii/.nii.gz file or a folder of them. "
                "Check the path (and quoting of spaces)."
            )
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_nifti_name(p) and not p.name.startswith("."))
            if not found:
                raise InputNotFoundError(
                    f"folder '{raw}' holds no .nii/.nii.gz scans; expected at least one. "
                    "Pass the scan files or the folder that holds them."
                )
            cases.extend(CaseInput(case_id(p), p) for p in found)
        else:
            cases.append(CaseInput(case_id(path), path))
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen and seen[case.case_id].resolve() != case.path.resolve():
            raise UsageError(
                f"two inputs have the case id '{case.case_id}' ({seen[case.case_id]} and {case.path}); "
                "expected unique file names. Rename one of them."
            )
        seen[case.case_id] = case.path
    unique = {c.case_id: c for c in cases}
    return [unique[k] for k in sorted(unique)]
