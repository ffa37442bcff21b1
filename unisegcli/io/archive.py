"""The one zip reader for DICOM zips, weights imports and nnU-Net model zips: which members must
never be extracted, and one capped, all-or-nothing extractor."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from unisegcli.errors import ArchiveError, UnisegError

MAX_EXTRACT_BYTES = 64 * 1024**3  # the declared sizes of all members (zip bombs are refused)
MAX_EXTRACT_FILES = 200_000
_SPECIAL = {stat.S_IFLNK: "symbolic link", stat.S_IFCHR: "device file", stat.S_IFBLK: "device file",
            stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket"}


def unsafe_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member must not be extracted (absolute path, '..', a link, device, FIFO or
    socket), or None if it is safe.

    Names are checked with both separators, and drive letters count as absolute, so archives
    made on Windows cannot escape the target folder either.
    """
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "'..' in its path"
    kind = _SPECIAL.get(stat.S_IFMT(info.external_attr >> 16))
    return kind


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


def extract_zip(source: Path, target: Path, *, fix: str, error: type[UnisegError] = ArchiveError,
                max_bytes: int = MAX_EXTRACT_BYTES, max_files: int = MAX_EXTRACT_FILES) -> Path:
    """Unpack ``source`` into the new folder ``target``, all-or-nothing; returns ``target``.

    Before anything is written every member is checked (``unsafe_member``), and the member
    count and the sizes the archive declares are capped (``error`` names the archive and ends
    with ``fix``). Members go into a hidden staging folder beside ``target`` that is renamed at
    the end, so ``target`` appears complete or not at all; a member longer than it declared
    cannot be written (the zip reader stops at the declared size and checks the CRC).
    """
    members = _members(source, fix=fix, error=error)
    if len(members) > max_files:
        raise error(f"'{source}' has {len(members)} entries; expected at most {max_files}. {fix}")
    if sum(m.file_size for m in members) > max_bytes:
        raise error(f"'{source}' unpacks to more than {max_bytes / 1024**3:g} GiB; expected less. {fix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with zipfile.ZipFile(source) as archive:
            for member in members:
                out = staging.joinpath(*[p for p in re.split(r"[\\/]", member.filename) if p])
                if staging.resolve() not in out.resolve().parents:  # defence in depth after the checks
                    raise error(f"'{source}' entry '{member.filename}' leaves the extraction folder. {fix}")
                if member.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as reader, open(out, "wb") as writer:
                    shutil.copyfileobj(reader, writer, 1 << 20)
        os.replace(staging, target)
    except (OSError, zipfile.BadZipFile) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if target.is_dir():  # a concurrent extraction of the same archive finished first
            return target
        raise error(f"cannot unpack '{source}' ({type(exc).__name__}: {exc}). {fix}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _members(source: Path, *, fix: str, error: type[UnisegError]) -> list[zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise error(f"cannot read '{source}' as a .zip archive ({type(exc).__name__}); {fix}") from None
    for member in members:
        reason = unsafe_member(member)
        if reason is not None:
            raise error(f"'{source}' has an unsafe entry '{member.filename}' ({reason}); expected plain relative "
                        f"file names. Nothing was extracted. {fix}")
    return members
