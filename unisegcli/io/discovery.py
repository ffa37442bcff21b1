"""Turn what the user typed into a sorted list of cases with unique ids.

Sources: files, folders (searched recursively for .nii/.nii.gz files and DICOM studies: one
case per study, ``io.dicom_cases``), shell globs (also when quoted), an input list
(``--input-list FILE`` or ``-`` for stdin: one path per line, or a CSV with ``case_id,path``
and/or one column per channel name), and explicit channel files (``--channel t1=a.nii.gz``).

Case ids are file names without .nii/.nii.gz (for DICOM, the study folder's path below the
input folder with '/' as '_', or the input folder's name when it is the study). nnU-Net style channel files
``case_0000.nii.gz, case_0001.nii.gz, ...`` form one multi-channel case ``case`` when their
count equals the number of channels the requested tasks need; otherwise each file is a case
of its own (so a cohort numbered ``case_0000 ... case_0011`` is not mistaken for one
12-channel scan).
"""

from __future__ import annotations

import csv
import glob
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, TextIO

from unisegcli.errors import InputNotFoundError, UsageError
from unisegcli.io.nifti import case_id, is_nifti_name
from unisegcli.io.nifti_header import require_regular_file

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<index>\d{4})$")
_GLOB_CHARS = set("*?[")
_UNSAFE_ID_CHARS = set("/\\\0")


def check_case_id(cid: str, where: str) -> str:
    """A case id names the folder ``OUT/<case_id>``: it must be one plain path component (no
    separator, not '.'/'..', not hidden, no control characters), so no output lands outside OUT."""
    if (not cid or cid in (".", "..") or cid.startswith(".") or _UNSAFE_ID_CHARS & set(cid)
            or any(ord(c) < 32 for c in cid)):
        raise UsageError(
            f"{where}: case id {cid!r} is not a plain folder name; expected letters, digits and "
            "'_', '-', '.' without '/' or a leading '.' (the id becomes OUT/<case_id>). Rename it."
        )
    return cid


@dataclass(frozen=True)
class CaseInput:
    """One case: its id and its files.

    paths: one file (3D, or 4D with channels in the task's order), several channel files in
    channel order, or one DICOM series folder/.zip (``dicom`` True). channel_names: the
    name of each path's channel when the user named them (``--channel``, CSV columns),
    else None (channels are taken in order).
    """

    case_id: str
    paths: tuple[Path, ...]
    channel_names: tuple[str, ...] | None = None
    dicom: bool = False

    @property
    def path(self) -> Path:
        """The first (or only) file: used in messages and as the geometry template."""
        return self.paths[0]


def _expand(raw: str | Path) -> list[Path]:
    """A path as given, or the matches of a (quoted) glob pattern."""
    text = str(raw)
    path = Path(text).expanduser()
    if path.exists() or not (_GLOB_CHARS & set(text)):
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    if not matches:
        raise InputNotFoundError(
            f"pattern '{raw}' matches no file; expected .nii/.nii.gz files or folders. "
            "Check the pattern and the current folder."
        )
    return matches


def _scan_folder(folder: Path, raw: str | Path) -> tuple[list[Path], list[Path]]:
    """NIfTI files and DICOM study folders below ``folder`` (hidden names skipped, and the
    outputs of earlier uniseg runs: files listed in their folder's done marker). A DICOM case
    is a study: see ``io.dicom_cases``."""
    from unisegcli.outputs.markers import written_files

    nifti = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and is_nifti_name(p) and not p.name.startswith(".") and p.name not in written_files(p.parent)
    )
    dicom: list[Path] = []
    if not nifti:
        from unisegcli.io.dicom_cases import study_folders

        dicom = study_folders(folder)
    if not nifti and not dicom:
        raise InputNotFoundError(
            f"folder '{raw}' holds no .nii/.nii.gz scans or DICOM series; expected at least one. "
            "Pass the scan files or the folder that holds them."
        )
    return nifti, dicom


def _study_ids(studies: list[Path], root: Path) -> list[str]:
    from unisegcli.io.dicom_cases import case_ids

    return case_ids(studies, root) if studies else []


def _group_channel_files(files: Sequence[Path], channels_needed: int) -> list[CaseInput]:
    """Cases from NIfTI files, grouping nnU-Net style ``<case>_<dddd>`` channel files."""
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    singles: list[Path] = []
    for path in files:
        match = _CHANNEL_SUFFIX.match(case_id(path))
        if match:
            key = (path.parent, match["case"])
            groups.setdefault(key, {})[int(match["index"])] = path
        else:
            singles.append(path)
    looks_like_channels = bool(groups) and all(
        sorted(g) == list(range(channels_needed)) for g in groups.values()
    )
    if not looks_like_channels:
        return [CaseInput(case_id(p), (p,)) for p in files]
    cases = [CaseInput(case_id(p), (p,)) for p in singles]
    for (_, name), members in groups.items():
        cases.append(CaseInput(name, tuple(members[i] for i in sorted(members))))
    return cases


def _read_list_text(path: Path, source: str | Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"input list '{source}' is not UTF-8 text (byte {exc.start} cannot be decoded); expected "
            "one path per line or a CSV in UTF-8. Save it as UTF-8 (Excel: 'CSV UTF-8')."
        ) from None
    except OSError as exc:
        raise InputNotFoundError(
            f"cannot read input list '{source}': {exc.strerror or exc}; expected a readable text file."
        ) from None


def read_input_list(source: str | Path, stdin: TextIO | None = None) -> list[CaseInput]:
    """Cases from a text list (one path per line) or a CSV (``case_id,path`` or channel columns).

    ``-`` reads standard input. Relative paths are taken relative to the list file's folder
    (the current folder for stdin). Blank lines and lines starting with '#' are skipped.
    """
    if str(source) == "-":
        text, base = (stdin or sys.stdin).read(), Path.cwd()
    else:
        path = Path(source).expanduser()
        # A pipe is a list too: `--input-list <(ls scans/*.nii.gz)` passes /dev/fd/63.
        if not path.exists() or path.is_dir():
            raise InputNotFoundError(
                f"input list '{source}' {'is a folder' if path.is_dir() else 'does not exist'}; "
                "expected a text file with one path per line or a CSV with case_id,path columns."
            )
        # Paths in a list file are relative to its folder; in a piped list, to the current one.
        text, base = _read_list_text(path, source), path.parent if path.is_file() else Path.cwd()
    text = text.removeprefix("\ufeff")  # Excel's "CSV UTF-8" starts with a byte order mark
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputNotFoundError(f"input list '{source}' is empty; expected one scan per line.")

    def resolve(entry: str) -> Path:
        p = Path(entry.strip()).expanduser()
        return p if p.is_absolute() else base / p

    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if "," not in lines[0] or "case_id" not in header:
        return [CaseInput("", (resolve(ln),)) for ln in lines]  # ids come from the file names
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    channel_columns = [h for h in header if h not in ("case_id", "path")]
    cases = []
    for number, row in enumerate(rows, start=2):
        cid = (row.get("case_id") or "").strip()
        if not cid:
            raise UsageError(f"input list '{source}' line {number}: empty case_id; expected an id per row.")
        check_case_id(cid, f"input list '{source}' line {number}")
        if row.get("path"):
            cases.append(CaseInput(cid, (resolve(row["path"]),)))
        elif channel_columns and all(row.get(c) for c in channel_columns):
            paths = tuple(resolve(row[c]) for c in channel_columns)
            cases.append(CaseInput(cid, paths, tuple(channel_columns)))
        else:
            raise UsageError(
                f"input list '{source}' line {number}: no path; expected a 'path' column or one "
                f"column per channel ({', '.join(channel_columns) or 'e.g. ct,pet'})."
            )
    return cases


def parse_channels(specs: Sequence[str]) -> CaseInput:
    """``--channel name=path`` options as one case (id from the first file's name)."""
    names, paths = [], []
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--channel '{spec}' is not NAME=PATH; expected e.g. --channel t1=t1.nii.gz.")
        if name.strip() in names:
            raise UsageError(f"--channel '{name.strip()}' is given twice; expected each channel once.")
        names.append(name.strip().lower())
        paths.append(Path(value.strip()).expanduser())
    cid = _CHANNEL_SUFFIX.sub(r"\g<case>", case_id(paths[0]))
    return CaseInput(cid, tuple(paths), tuple(names))


def discover(
    inputs: Iterable[str | Path],
    *,
    input_list: str | Path | None = None,
    channels: Sequence[str] = (),
    channels_needed: int = 1,
    stdin: TextIO | None = None,
) -> list[CaseInput]:
    """All cases to run, sorted by case id.

    Raises InputNotFoundError for a missing path, an empty folder or an empty list, and
    UsageError for two different inputs that would get the same case id or for no input.
    """
    cases: list[CaseInput] = []
    nifti_files: list[Path] = []
    for raw in inputs:
        for path in _expand(raw):
            if not path.exists():
                raise InputNotFoundError(
                    f"input '{raw}' does not exist; expected a .nii/.nii.gz file, a DICOM folder "
                    "or a folder of scans. Check the path (and quoting of spaces)."
                )
            require_regular_file(path)  # a FIFO, socket or device: refused before any open()
            if path.is_dir():
                found, studies = _scan_folder(path, raw)
                nifti_files.extend(found)
                cases.extend(CaseInput(cid, (d,), dicom=True) for cid, d in zip(_study_ids(studies, path), studies))
            elif path.suffix.lower() == ".zip":
                cases.append(CaseInput(path.stem, (path,), dicom=True))
            else:
                nifti_files.append(path)
    cases.extend(_group_channel_files(nifti_files, channels_needed))
    if input_list is not None:
        for case in read_input_list(input_list, stdin):
            cid = case.case_id or case_id(case.path)
            cases.append(CaseInput(cid, case.paths, case.channel_names, dicom=case.path.suffix.lower() == ".zip"))
    if channels:
        cases.append(parse_channels(channels))
    if not cases:
        raise UsageError(
            "no input given; expected scan files or folders, --input-list FILE (or - for stdin), "
            "or --channel NAME=PATH."
        )
    by_id: dict[str, CaseInput] = {}
    for case in cases:
        known = by_id.get(case.case_id)
        if known is not None and [p.resolve() for p in known.paths] != [p.resolve() for p in case.paths]:
            raise UsageError(
                f"two inputs have the case id '{case.case_id}' ({known.path} and {case.path}); "
                "expected unique file names. Rename one, or give ids in a CSV --input-list."
            )
        by_id[case.case_id] = case
    return [by_id[k] for k in sorted(by_id)]
