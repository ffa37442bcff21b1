"""The work on one case of a batch, the same in this process and in a worker process: predict,
write every file (all-or-nothing), mark it done; or record why it failed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unisegcli.errors import UnisegError
from unisegcli.io.cases import LoadedCase
from unisegcli.io.discovery import CaseInput
from unisegcli.outputs import markers
from unisegcli.results import CaseFailure, CaseResult, Result

if TYPE_CHECKING:
    from unisegcli.session import Segmenter


@dataclass
class Planned:
    """A case to run: its output folder and the done-marker record it will write."""

    case: CaseInput
    folder: Path
    record: dict[str, Any]


def one_case(segmenter: "Segmenter", loaded: LoadedCase, planned: Planned,
             cohort_folder: Path | None) -> CaseResult:
    """Predict and write one case (all-or-nothing), then mark it done."""
    started = time.perf_counter()
    markers.clear_marker(planned.folder)
    segmentation = segmenter.segment_case(loaded)
    written = segmentation.save(planned.folder, cohort_folder=cohort_folder)
    markers.write_marker(planned.folder, planned.record, written.files)
    return CaseResult(
        case_id=loaded.case.case_id,
        input_path=loaded.case.path,
        output_dir=planned.folder,
        masks=dict(written.masks),
        volumes_ml=dict(written.volumes_ml),
        seconds=time.perf_counter() - started,
        files=list(written.files),
        flags={k: list(v) for k, v in (written.flagged or {}).items()},
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
