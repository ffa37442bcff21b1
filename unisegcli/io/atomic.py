"""All-or-nothing file writes: stage under hidden temp names in the target folder, then rename.

Temp files live in the same folder as their final names so ``os.replace`` is an atomic
rename on one file system; a crash or error leaves only hidden ``.*.tmp*`` files, which are
removed on the error path, never a partial file under a final name.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from unisegcli.errors import OutputError


WRITE_PROBE_PREFIX = ".uniseg-write-test-"  # io.nifti.check_output_dir's probe files
_STALE_PATTERNS = (".*.tmp*", WRITE_PROBE_PREFIX + "*")  # what ``stage`` names, and the probes


def remove_stale_staged_files(folder: Path, before: float) -> list[Path]:
    """Remove staged files and write probes that an interrupted run (killed with -9) left in
    ``folder``: only those last changed before ``before`` (a run's start, Unix seconds), so no
    file of a run writing right now is ever touched."""
    if not folder.is_dir():
        return []
    removed = []
    for path in (p for pattern in _STALE_PATTERNS for p in folder.glob(pattern)):
        try:
            if path.is_file() and path.stat().st_mtime < before:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs (main thread only); they arrive right after."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def staged_files(folder: Path) -> Iterator[Callable[[str], Path]]:
    """Yield ``stage(name) -> temp path``; on success every staged file is renamed to ``folder/name``.

    The renames happen only after the ``with`` body finished without error, so several files
    (all masks of a case) appear together or not at all. OSError becomes OutputError.
    """
    folder = Path(folder)
    staged: list[tuple[Path, Path]] = []

    def stage(name: str) -> Path:
        final = folder / name
        suffix = ".tmp.nii.gz" if name.endswith(".gz") else ".tmp" + "".join(Path(name).suffixes[-1:])
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
        # mkstemp creates 0600; results are shared files (HPC groups), so give them the
        # permissions a plain open() would: 0666 minus the umask.
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        staged.append((Path(tmp_name), final))
        return Path(tmp_name)

    try:
        yield stage
        with _interrupts_deferred():  # Ctrl-C lands after the last rename, not between two
            for tmp, final in staged:
                os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(
            f"cannot write into '{folder}': {exc.strerror or exc}; expected a writable folder "
            "with free space. Free disk space or choose another -o folder."
        ) from exc
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Write a small text file (JSON, CSV, markers) atomically."""
    path = Path(path)
    with staged_files(path.parent) as stage:
        stage(path.name).write_text(text, encoding="utf-8")
    return path
