"""The work on one case of a batch, the same in this process and in a worker process: predict,
write every file (all-or-nothing), mark it done; or record why it failed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unisegcli.errors import OutputError, UnisegError
from unisegcli.io.atomic import remove_stale_staged_files
from unisegcli.io.cases import LoadedCase, dicom_channels, read_case
from unisegcli.io.discovery import CaseInput
from unisegcli.outputs import markers
from unisegcli.outputs.dicom_out import check_dicom_output
from unisegcli.results import CaseFailure, CaseResult, Result

if TYPE_CHECKING:
    from unisegcli.results import Segmentation
    from unisegcli.session import Segmenter


@dataclass
class Planned:
    """A case to run: its output folder and the done-marker record it will write."""

    case: CaseInput
    folder: Path
    record: dict[str, Any]


def read_checked(segmenter: "Segmenter", case: CaseInput, series_uid: str | None) -> LoadedCase:
    """Read a case for this Segmenter (the DICOM series its tasks' channels need) and check,
    before any work on it, that its outputs can be written (SEG/RTSTRUCT need the source's UIDs)."""
    loaded = read_case(case, series_uid, dicom_channels(segmenter.tasks))
    check_dicom_output(segmenter.outputs.output_type, loaded.dicom)
    return loaded


def one_case(segmenter: "Segmenter", loaded: LoadedCase, planned: Planned,
             cohort_folder: Path | None) -> CaseResult:
    """Predict and write one case (all-or-nothing), then mark it done (``begin_case``, the
    Segmenter's ``segment_case``, ``write_case``)."""
    started = time.perf_counter()
    previous = begin_case(segmenter, planned)
    segmentation = segmenter.segment_case(loaded)
    return write_case(segmentation, planned, previous, cohort_folder, started=started)


def begin_case(segmenter: "Segmenter", planned: Planned) -> set[str]:
    """Before a case is predicted: its done marker goes (a failure leaves it not done), and so
    do staged temp files of an earlier run (a run killed with -9 leaves them). Returns the
    names of the files the marker listed."""
    folder = planned.folder
    previous = markers.written_files(folder)
    markers.clear_marker(folder)
    remove_stale_staged_files(folder, before=segmenter.started)
    return previous


def write_case(segmentation: "Segmentation", planned: Planned, previous: set[str], cohort_folder: Path | None, *,
               started: float) -> CaseResult:
    """Write a predicted case (all-or-nothing), then mark it done.

    Files the earlier marker listed (``previous``) that this run does not write go (masks of
    tasks no longer requested). If the marker itself cannot be written, this run's files are
    removed again: a case is complete with its marker, or absent. started: the case's
    ``time.perf_counter()`` start, for ``CaseResult.seconds``.
    """
    folder = planned.folder
    writing = time.perf_counter()
    written = segmentation.save(folder, cohort_folder=cohort_folder)
    for name in previous - {p.name for p in written.files}:
        (folder / name).unlink(missing_ok=True)
    try:
        markers.write_marker(folder, planned.record, written.files)
    except OutputError:
        for path in written.files:
            path.unlink(missing_ok=True)
        raise
    loaded = segmentation.loaded
    return CaseResult(
        case_id=loaded.case.case_id,
        input_path=loaded.case.path,
        output_dir=folder,
        masks=dict(written.masks),
        volumes_ml=dict(written.volumes_ml),
        seconds=time.perf_counter() - started,
        files=list(written.files),
        flags={k: list(v) for k, v in (written.flagged or {}).items()},
        compare=dict(written.compare),
        input_series=[c.as_dict() for c in loaded.dicom.choices] if loaded.dicom is not None else [],
        timings=dict(segmentation.timings, write=time.perf_counter() - writing),
    )


def record_failure(result: Result, events: Any, case: CaseInput, error: UnisegError | tuple[str, str, int], *,
                   worker: str | None = None) -> None:
    """Count a failed case, append it to ``OUT/failures.jsonl`` and send the event. error: the
    exception, or (class name, message, exit code) as a worker process reported it."""
    name, message, code = ((type(error).__name__, str(error), int(error.exit_code))
                           if isinstance(error, UnisegError) else error)
    failure = CaseFailure(case.case_id, case.path, name, message, code, worker=worker)
    result.failures.append(failure)
    entry = {"case_id": case.case_id, "input": str(case.path), "error": name, "message": message, "exit_code": code}
    if worker is not None:
        entry["worker"] = worker
    markers.log_failure(result.output, entry)
    events.case_failed(failure)
