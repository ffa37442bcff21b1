"""Zip members that must never be extracted: one rule for weights imports and DICOM zips."""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import Path

from unisegcli.errors import ArchiveError


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member must not be extracted (absolute path, '..', link), or None if it is safe.

    Names are checked with both separators, and drive letters count as absolute, so archives
    made on Windows cannot escape the target folder either.
    """
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "'..' in its path"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link"
    return None


def checked_members(source: Path, *, fix: str) -> list[zipfile.ZipInfo]:
    """The members of the zip ``source``, refusing the whole archive (ArchiveError, nothing
    extracted) if it cannot be read or any member is unsafe; ``fix`` ends the message."""
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ArchiveError(f"cannot read {source} as a .zip archive: {exc}; download it again.") from exc
    unsafe = [f"'{m.filename}' ({why})" for m in members if (why := unsafe_member(m))]
    if unsafe:
        raise ArchiveError(
            f"refusing {source}: unsafe members {', '.join(unsafe)}; expected plain relative paths. "
            f"Nothing was written. {fix}"
        )
    return members
