"""Zip members that must never be extracted: one rule for weights imports and DICOM zips."""

from __future__ import annotations

import re
import stat
import zipfile


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
