"""A batch in three overlapping stages, so the network waits for no file.

    preparer thread:  read case n+2, prepare it (crop, resample, normalise)  -> queue (bounded)
    main thread:      case n in the network (Segmenter.infer_case)           -> queue (bounded)
    writer thread:    restore case n-1 to its scan's grid, write its files, mark it done

Each queue holds at most ``depth`` cases, and each thread at most one more in hand, so memory is
bounded by a few cases whatever the cohort size. nnU-Net v2's ``predict_from_files`` overlaps
the same way with worker processes (``nnunetv2/inference/predict_from_raw_data.py``:
``preprocessing_iterator_fromfiles`` feeds the GPU, ``export_pool`` writes); threads suffice
here because the heavy steps (torch, numpy, zlib) release the GIL.

Every event is sent from the main thread, in case order: ``case_started`` when a case enters
the network, ``case_done``/``case_failed`` once its files are written (so case n+1 may start
before case n is done). A case that fails in any stage is recorded and the others go on; a
KeyboardInterrupt stops the threads after the case each one holds: a case being written ends
complete with its marker, the others are absent.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from unisegcli.casework import Planned, begin_case, record_failure, write_case
from unisegcli.errors import UnisegError

if TYPE_CHECKING:
    from pathlib import Path

    from unisegcli.io.cases import LoadedCase
    from unisegcli.io.discovery import CaseInput
    from unisegcli.results import CaseResult, Result
    from unisegcli.session import Segmenter, StagedCase

DEPTH = 1  # cases waiting between two stages (each thread holds one more)
# torch threads of the preparer and the writer when the network runs on the CPU (None: torch's
# default, as many as the network's): they then leave the network's cores mostly to it
CPU_STAGE_THREADS: int | None = 1
_POLL_S = 0.1  # how often a blocked thread looks at the stop flag
_END = None  # closes a queue


@dataclass
class _Entry:
    """A case between the stages; ``error`` once a stage failed."""

    planned: Planned
    staged: "StagedCase | None" = None
    error: BaseException | None = None
    read: bool = False  # the case was read (a failure after that clears its done marker)
    previous: set[str] | None = None
    started: float = 0.0  # time.perf_counter() when it entered the network
    outcome: "CaseResult | None" = None


class StagedBatch:
    """One run over ``todo`` (see the module docstring); ``run`` returns when every case is
    done, failed, or the run was interrupted."""

    def __init__(self, segmenter: "Segmenter", todo: Sequence[Planned], load: Callable[["CaseInput"], "LoadedCase"],
                 cohort_folder: "Path", result: "Result", depth: int = DEPTH) -> None:
        self.segmenter, self.todo, self.load = segmenter, list(todo), load
        self.cohort_folder, self.result = cohort_folder, result
        self.prepared: queue.Queue[_Entry | None] = queue.Queue(maxsize=depth)
        self.inferred: queue.Queue[_Entry | None] = queue.Queue(maxsize=depth)
        self.written: queue.Queue[_Entry] = queue.Queue()  # small results, back to the main thread
        self.stop = threading.Event()

    def run(self) -> None:
        threads = [threading.Thread(target=self._prepare_all, name="uniseg-prepare", daemon=True),
                   threading.Thread(target=self._write_all, name="uniseg-write", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            for number, _ in enumerate(self.todo, start=1):
                entry = self._take(self.prepared)
                self._report_written()
                self.segmenter.events.case_started(entry.planned.case, number, len(self.todo))
                self._infer(entry)
                self._give(self.inferred, entry)
            self._give(self.inferred, _END)
            threads[1].join()
        finally:
            self.stop.set()  # on an error or Ctrl-C: each thread ends after the case it holds
            for thread in threads:
                thread.join()
            self._report_written()

    # -- main thread ----------------------------------------------------------------------

    def _infer(self, entry: _Entry) -> None:
        entry.started = time.perf_counter()
        try:
            if entry.read:  # as in casework.one_case: a case that fails from here on is not done
                entry.previous = begin_case(self.segmenter, entry.planned)
            if entry.error is None:
                assert entry.staged is not None
                self.segmenter.infer_case(entry.staged)
        except UnisegError as exc:
            entry.error, entry.staged = exc, None

    def _report_written(self) -> None:
        """Send the events of the cases the writer finished; an unexpected error ends the run."""
        while True:
            try:
                entry = self.written.get_nowait()
            except queue.Empty:
                return
            if entry.outcome is not None:
                self.result.cases.append(entry.outcome)
                self.segmenter.events.case_done(entry.outcome)
            elif isinstance(entry.error, UnisegError):
                record_failure(self.result, self.segmenter.events, entry.planned.case, entry.error)
            elif entry.error is not None:
                self.stop.set()
                raise entry.error

    # -- threads --------------------------------------------------------------------------

    def _limit_threads(self) -> None:
        """On the CPU, this stage thread's torch ops use CPU_STAGE_THREADS (a per-thread setting)."""
        if CPU_STAGE_THREADS is not None and getattr(self.segmenter.device, "type", None) == "cpu":
            import torch

            torch.set_num_threads(CPU_STAGE_THREADS)

    def _prepare_all(self) -> None:
        self._limit_threads()
        for planned in self.todo:
            if self.stop.is_set():
                return
            entry = _Entry(planned)
            try:
                started = time.perf_counter()
                loaded = self.load(planned.case)
                read_s = time.perf_counter() - started
                entry.read = True
                entry.staged = self.segmenter.prepare_case(loaded, timings={"read": read_s})
            except BaseException as exc:  # noqa: BLE001 - the main thread records or re-raises it
                entry.error = exc
            if not self._give(self.prepared, entry):
                return

    def _write_all(self) -> None:
        self._limit_threads()
        while True:
            entry = self._take(self.inferred)
            if entry is None:
                return
            if entry.error is None:
                assert entry.staged is not None and entry.previous is not None
                try:
                    segmentation = self.segmenter.finish_case(entry.staged)
                    entry.staged = None
                    entry.outcome = write_case(segmentation, entry.planned, entry.previous, self.cohort_folder,
                                               started=entry.started)
                except BaseException as exc:  # noqa: BLE001 - the main thread records or re-raises it
                    entry.error, entry.staged = exc, None
            self.written.put(entry)
            if self.stop.is_set():
                return

    # -- queues that give up when the run stops ------------------------------------------

    def _give(self, to: "queue.Queue[_Entry | None]", entry: _Entry | None) -> bool:
        """Put ``entry`` (blocks while the queue is full); False if the run stopped meanwhile."""
        while not self.stop.is_set():
            try:
                to.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _take(self, source: "queue.Queue[_Entry | None]") -> Any:
        """The next entry (blocks while the queue is empty); None once the run stopped."""
        while not self.stop.is_set():
            try:
                return source.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None
