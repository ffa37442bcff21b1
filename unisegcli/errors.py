"""Domain exceptions and the exit codes they map to.

Library code raises these; only ``unisegcli.cli`` catches them and turns the class into an
exit code and a one-line message. Every message says what was received, what was expected
and how to fix it.
"""

from __future__ import annotations

import difflib
from enum import IntEnum
from typing import Iterable


class ExitCode(IntEnum):
    """Process exit codes, documented in README.md ("Exit codes")."""

    OK = 0
    INTERNAL = 1  # a bug: unexpected exception (traceback with --debug)
    USAGE = 2  # bad command line: unknown option, task, model, conflicting flags
    INPUT = 3  # an input scan cannot be used: missing, unreadable, wrong shape or values
    WEIGHTS = 4  # model weights missing, corrupt, unsafe or not downloadable
    RUNTIME = 5  # device or runtime failure: no GPU, out of memory
    PARTIAL = 6  # batch: some cases failed, the others were written
    OUTPUT = 7  # output cannot be written: folder unwritable, is a file, disk full
    ALL_FAILED = 8  # batch: every case failed
    INTERRUPTED = 130  # SIGINT/SIGTERM: stopped cleanly, no partial files


class UnisegError(Exception):
    """Base class of every error a user can act on."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(UnisegError):
    """The command line asks for something that does not exist or does not fit together."""

    exit_code = ExitCode.USAGE


class UnknownTaskError(UsageError):
    """--tasks names a task the chosen model does not have."""


class UnknownModelError(UsageError):
    """--model names a model that is not in the registry."""


class InputError(UnisegError):
    """An input scan cannot be used as given."""

    exit_code = ExitCode.INPUT


class InputNotFoundError(InputError):
    """An input path does not exist, or a folder holds no scans."""


class ImageFormatError(InputError):
    """A file is not a readable NIfTI/DICOM image (wrong format, truncated, corrupt)."""


class ImageShapeError(InputError):
    """An image has the wrong number of dimensions, an empty axis or the wrong channels."""


class ImageValueError(InputError):
    """An image has unusable values or geometry: NaN/Inf voxels, a singular affine."""


class ChannelError(InputError):
    """The channels given do not match those the task expects."""


class WeightsError(UnisegError):
    """Model weights are missing, corrupt, unsafe or cannot be fetched."""

    exit_code = ExitCode.WEIGHTS


class CheckpointError(WeightsError):
    """A checkpoint or plans file cannot be loaded (truncated, wrong format, wrong keys)."""


class UnsafePickleError(CheckpointError):
    """A pickle asks for a global outside the allow-list; nothing in it was executed."""


class DownloadError(WeightsError):
    """A weights file could not be downloaded (network, HTTP error, HTML instead of data)."""


class ChecksumError(WeightsError):
    """A file's sha256 differs from the registry's or the cache manifest's."""


class OfflineError(WeightsError):
    """A file is needed but offline mode forbids downloading it."""


class ArchiveError(WeightsError):
    """An archive to import is unsafe (absolute paths, '..', links) or unreadable."""


class DeviceError(UnisegError):
    """The requested device is not available or failed at run time."""

    exit_code = ExitCode.RUNTIME


class HostMemoryError(DeviceError):
    """Host memory ran out while reading or segmenting a scan (too large for this machine)."""


class OutputError(UnisegError):
    """Results cannot be written where asked."""

    exit_code = ExitCode.OUTPUT


def suggest(word: str, choices: Iterable[str]) -> str:
    """Return "; did you mean 'x'?" for the closest choice, or "." when none is close."""
    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else "."
