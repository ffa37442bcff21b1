"""A batch run of a Segmenter over files: discovery, shards, resume markers, per-case failures.

Order of work: the inputs, the shard and the output folder are checked before the weights are
loaded; a single case is also read before, so a bad scan fails fast with its own exit code.
Cases then run read -> predict (all tasks of a case in one pass) -> write; with a family that
runs in stages, reading and preparing the next cases and restoring and writing the previous
ones overlap with the network (``staged_batch``), else the next case is read on a background
thread meanwhile. One case writes into ``OUT/``; several into
``OUT/<case_id>/``. In a batch, a failing case is logged to ``OUT/failures.jsonl`` and the
others go on; a single case raises its error.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, TextIO

from unisegcli.casework import Planned, one_case, read_checked, record_failure
from unisegcli.errors import InputNotFoundError, UnisegError
from unisegcli.io.cases import LoadedCase, task_channels
from unisegcli.io.discovery import CaseInput, discover
from unisegcli.io.nifti import check_output_dir
from unisegcli.io.sharding import parse_shard, select_shard
from unisegcli.outputs import markers
from unisegcli.results import Result

if TYPE_CHECKING:
    from unisegcli.session import Segmenter
    from unisegcli.workers import WorkerSpec


@dataclass(frozen=True)
class BatchRequest:
    """What to segment and where: ``Segmenter.run``'s arguments."""

    inputs: Sequence[str | Path]
    output: Path
    input_list: str | Path | None = None
    channels: tuple[str, ...] = ()
    series_uid: str | None = None
    shard: str | None = None
    overwrite: bool = False
    stdin: TextIO | None = None
    workers: tuple["WorkerSpec", ...] = ()


def run_batch(segmenter: "Segmenter", request: BatchRequest) -> Result:
    """Run every case of ``request`` (see the module docstring); returns the Result."""
    events = segmenter.events
    shard_spec = parse_shard(request.shard)
    all_cases = discover(list(request.inputs), input_list=request.input_list, channels=request.channels,
                         channels_needed=max(len(t.channels) for t in segmenter.tasks), stdin=request.stdin)
    cases = select_shard(all_cases, shard_spec)
    single = len(all_cases) == 1
    out_root = check_output_dir(Path(request.output))
    result = Result(model=segmenter.card, tasks=tuple(segmenter.tasks), device=str(segmenter.device),
                    output=out_root)
    todo, blocked = _plan(segmenter, request, cases, all_cases=all_cases, single=single, result=result)
    first: LoadedCase | None = None
    if todo and single:  # read (and check the channels of) a single case before the weights load
        first = read_checked(segmenter, todo[0].case, request.series_uid)  # before the weights load
        for task in segmenter.tasks:
            task_channels(first, task)
    parallel = bool(request.workers) and len(todo) > 1
    if todo and not parallel:
        segmenter.load()
    device = ", ".join(w.device for w in request.workers) if parallel else str(segmenter.device)
    events.run_started(segmenter.card, segmenter.tasks, cases, device)
    for case, exc in blocked:
        record_failure(result, events, case, exc)
    try:
        if parallel:
            from unisegcli.workers import WorkerPool

            WorkerPool(segmenter, request.workers, request.series_uid, out_root, result).run(todo)
        else:
            _run_cases(segmenter, todo, first, request.series_uid, None if single else out_root, result)
    except KeyboardInterrupt:
        result.interrupted = True
        events.run_finished(result)
        raise
    events.run_finished(result)
    return result


def _plan(segmenter: "Segmenter", request: BatchRequest, cases: Sequence[CaseInput], *,
          all_cases: Sequence[CaseInput], single: bool,
          result: Result) -> tuple[list[Planned], list[tuple[CaseInput, UnisegError]]]:
    """Cases to run, and cases that cannot run (an output would replace an input, an input
    vanished); skips cases an earlier run finished. A single case raises instead."""
    from unisegcli.outputs.writer import check_inputs_spared, output_names

    names = list(output_names(segmenter.structures, segmenter.outputs).values())
    every_input = [p for case in all_cases for p in case.paths]
    options = segmenter.marker_options()
    card = segmenter.card
    todo: list[Planned] = []
    blocked: list[tuple[CaseInput, UnisegError]] = []
    for case in cases:
        folder = result.output if single else result.output / case.case_id
        try:
            check_inputs_spared(folder, names, every_input)
            record = _marker_record(card.name, card.version, [t.name for t in segmenter.tasks], options, case)
        except UnisegError as exc:
            if single:
                raise
            blocked.append((case, exc))  # recorded as failed once the run has started
            continue
        if not request.overwrite and markers.is_done(folder, record):
            result.skipped.append(case.case_id)
            segmenter.events.case_skipped(case, folder)
            continue
        todo.append(Planned(case, folder, record))
    return todo, blocked


def _marker_record(model: str, version: str, tasks: list[str], options: dict[str, Any],
                   case: CaseInput) -> dict[str, Any]:
    try:
        return markers.marker_record(model, version, tasks, options, case.paths)
    except OSError as exc:  # the input vanished or cannot be read: this case fails, not the run
        raise InputNotFoundError(
            f"input '{case.path}' of case '{case.case_id}' cannot be read ({exc.strerror or exc}); "
            "expected an existing file. Check the path in the input list."
        ) from None


def _run_cases(segmenter: "Segmenter", todo: Sequence[Planned], first: LoadedCase | None,
               series_uid: str | None, cohort_folder: Path | None, result: Result) -> None:
    """Run each case: in overlapping stages (``staged_batch``) when the Segmenter offers them and
    there are several cases; else one after the other, the next case read on a background
    thread meanwhile (a single case raises its error)."""
    if not todo:
        return
    events = segmenter.events

    def load(case: CaseInput) -> LoadedCase:
        return first if first is not None and first.case == case else read_checked(segmenter, case, series_uid)

    if cohort_folder is not None and len(todo) > 1 and getattr(segmenter, "staged", False):
        from unisegcli.staged_batch import StagedBatch

        StagedBatch(segmenter, todo, load, cohort_folder, result).run()
        return

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="uniseg-read") as pool:
        pending: Future[LoadedCase] = pool.submit(load, todo[0].case)
        for number, planned in enumerate(todo, start=1):
            current = pending
            if number < len(todo):
                pending = pool.submit(load, todo[number].case)
            events.case_started(planned.case, number, len(todo))
            started = time.perf_counter()
            try:
                case_result = one_case(segmenter, current.result(), planned, cohort_folder)
            except UnisegError as exc:
                if cohort_folder is None:
                    raise
                record_failure(result, events, planned.case, exc)
                continue
            case_result.seconds = time.perf_counter() - started
            result.cases.append(case_result)
            events.case_done(case_result)
