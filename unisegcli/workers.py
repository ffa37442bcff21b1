"""Worker processes: one command uses every device of a node (``--devices``, ``--workers``).

Each worker is a process (``spawn``: no CUDA state is ever forked) that builds its own
Segmenter once, on its own device, then takes cases one at a time. The parent keeps what must
be single: discovery, resume markers, ``failures.jsonl``, events and the progress display. It
hands the next case to whichever worker is free (a queue per worker, fed on demand: no static
split, so a large case does not leave the other devices idle). A worker writes its case's files
and marker itself, all-or-nothing as in one process; the cohort table is merged under its file
lock.

A worker that dies (killed, a CUDA error that takes the process down) loses only its current
case: the parent starts a new worker on that device and gives the case once more to whichever
worker is free; a second death on the same case fails it (exit code 5 in its entry). Ctrl-C or
SIGTERM stop every worker: each abandons its case without partial files (staged writes), and
the run ends as interrupted.
"""

from __future__ import annotations

import os
import pickle
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from unisegcli.errors import DeviceError, UnisegError, UsageError
from unisegcli.events import Events

if TYPE_CHECKING:
    from unisegcli.casework import Planned
    from unisegcli.results import Result
    from unisegcli.session import SessionConfig, Segmenter

POLL_S = 0.5  # how often the parent checks for dead workers while it waits for messages
STOP_GRACE_S = 60.0  # a stopped worker may finish removing its staged files


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process: its name (in events), device and CPU threads (None: torch's default)."""

    name: str
    device: str
    threads: int | None = None


def worker_specs(devices: str | None, workers: int | None, threads: int | None = None) -> list[WorkerSpec]:
    """Workers for ``--devices cuda:0,cuda:1`` (``all``: every visible CUDA device) or
    ``--workers N`` (CPU processes, the machine's cores split between them; ``--threads``
    sets each one's count instead). Neither: no workers (the run stays in this process)."""
    if devices and workers:
        raise UsageError("--devices and --workers were both given; expected one of them: --devices for GPUs "
                         "(one worker each), --workers N for CPU worker processes.")
    if workers is not None:
        if workers < 1:
            raise UsageError(f"--workers is {workers}; expected 1 or more worker processes.")
        share = threads or max(1, (os.cpu_count() or 1) // workers)
        return [WorkerSpec(f"w{k}", "cpu", share) for k in range(workers)]
    if not devices:
        return []
    names = _device_names(devices)
    from unisegcli.inference.engine import resolve_device

    for name in names:
        resolve_device(name)  # a device that does not exist fails now, with DeviceError
    if len(set(names)) != len(names):
        raise UsageError(f"--devices '{devices}' names a device twice; expected each device once.")
    return [WorkerSpec(f"w{k}", name, threads) for k, name in enumerate(names)]


def _device_names(devices: str) -> list[str]:
    if devices.strip().lower() == "all":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError("--devices all found no CUDA device; expected at least one visible GPU. Use "
                              "--workers N for CPU worker processes, or check CUDA_VISIBLE_DEVICES.")
        return [f"cuda:{k}" for k in range(count)]
    names = [d.strip().lower() for d in devices.split(",") if d.strip()]
    if not names:
        raise UsageError(f"--devices '{devices}' names no device; expected e.g. cuda:0,cuda:1 or all.")
    return names


class _Forward(Events):
    """A worker's events, sent to the parent (who shows them once, for every worker). Each
    worker has a pipe of its own: a worker killed in the middle of a message can only break
    its own pipe, never a lock that the other workers share."""

    def __init__(self, results: Any, name: str) -> None:
        self.results, self.name = results, name

    def warning(self, case_id: str, message: str) -> None:
        self.results.send(("warning", self.name, case_id, message))

    def case_retry(self, case_id: str, reason: str, message: str) -> None:
        self.results.send(("retry", self.name, case_id, reason, message))

    def windows(self, done: int, total: int) -> None:
        if done == total or done % 8 == 0:  # a bar, not a flood of messages
            self.results.send(("windows", self.name, done, total))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def worker_main(config: "SessionConfig", spec: WorkerSpec, inbox: Any, results: Any,
                series_uid: str | None, cohort_folder: Path | None) -> None:
    """A worker process: build the Segmenter once, then segment each case sent to ``inbox``
    until it receives None. Reports every step to ``results`` (its own pipe to the parent)."""
    import unisegcli.casework as casework

    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        segmenter = config.build(device=spec.device, threads=spec.threads, events=_Forward(results, spec.name))
        segmenter.load()
    except UnisegError as exc:
        results.send(("init_failed", spec.name, type(exc).__name__, str(exc), int(exc.exit_code)))
        return
    except KeyboardInterrupt:
        return
    results.send(("ready", spec.name))
    try:
        while (planned := inbox.get()) is not None:
            results.send(("started", spec.name, planned.case.case_id))
            try:
                loaded = casework.read_checked(segmenter, planned.case, series_uid)
                done = casework.one_case(segmenter, loaded, planned, cohort_folder)
            except UnisegError as exc:
                results.send(("failed", spec.name, planned.case.case_id, type(exc).__name__, str(exc),
                              int(exc.exit_code)))
                continue
            results.send(("done", spec.name, done))
    except KeyboardInterrupt:
        pass
    finally:
        segmenter.close()


@dataclass
class _Worker:
    spec: WorkerSpec
    process: Any
    inbox: Any
    messages: Any  # the parent's end of the worker's pipe
    case: "Planned | None" = None
    ready: bool = False


class WorkerPool:
    """The parent's side: start workers, feed them cases, turn their messages into events."""

    def __init__(self, segmenter: "Segmenter", specs: Sequence[WorkerSpec], series_uid: str | None,
                 cohort_folder: Path | None, result: "Result") -> None:
        import multiprocessing

        self.context = multiprocessing.get_context("spawn")
        self.segmenter, self.events, self.result = segmenter, segmenter.events, result
        self.series_uid, self.cohort_folder = series_uid, cohort_folder
        self.workers: dict[str, _Worker] = {}
        self.specs = list(specs)
        self.deaths: dict[str, int] = {}
        self.init_errors: list[tuple[str, str, int]] = []
        self.numbers: dict[str, int] = {}

    def run(self, todo: Sequence["Planned"]) -> None:
        """Segment ``todo`` on the workers; KeyboardInterrupt stops them all and propagates."""
        self.pending: deque[Planned] = deque(todo)
        self.total, self.finished = len(todo), 0
        try:
            for spec in self.specs:
                self._start(spec)
            while self.finished < self.total:
                self._dispatch()
                for message in self._receive():
                    self._handle(message)
                self._check_alive()
        finally:
            self._stop()

    def _receive(self) -> list[tuple[Any, ...]]:
        """The messages that arrived (waits up to POLL_S, or until a worker process ends)."""
        from multiprocessing.connection import wait

        by_handle = {w.messages: w for w in self.workers.values()}
        sentinels = [w.process.sentinel for w in self.workers.values()]
        messages = []
        for ready in wait([*by_handle, *sentinels], timeout=POLL_S):
            worker = by_handle.get(ready)
            if worker is not None:  # (an ended process: _check_alive drains and handles it)
                messages.extend(self._drain(worker))
        return messages

    def _start(self, spec: WorkerSpec) -> None:
        inbox = self.context.Queue()
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=worker_main, name=f"uniseg-{spec.name}", daemon=True,
            args=(self.segmenter.config, spec, inbox, sender, self.series_uid, self.cohort_folder))
        process.start()
        sender.close()  # the worker holds the only writing end: its death is an EOF here
        self.workers[spec.name] = _Worker(spec, process, inbox, receiver)

    def _dispatch(self) -> None:
        for worker in self.workers.values():
            if worker.ready and worker.case is None and self.pending:
                worker.case = self.pending.popleft()
                worker.inbox.put(worker.case)

    def _handle(self, message: tuple[Any, ...]) -> None:
        from unisegcli.casework import record_failure

        kind, name, *rest = message
        worker = self.workers.get(name)
        if kind == "ready" and worker is not None:
            worker.ready = True
        elif kind == "init_failed":  # the run stops only when no worker is left (_check_alive)
            self.init_errors.append((rest[0], rest[1], rest[2]))
        elif kind == "started" and worker is not None and worker.case is not None:
            case_id = worker.case.case.case_id  # a retried case keeps its number
            number = self.numbers.setdefault(case_id, len(self.numbers) + 1)
            self.events.case_started(worker.case.case, number, self.total, worker=self._label(worker))
        elif kind == "done" and worker is not None:
            case_result = rest[0]
            case_result.worker = self._label(worker)
            worker.case = None
            self.finished += 1
            self.result.cases.append(case_result)
            self.events.case_done(case_result)
        elif kind == "failed" and worker is not None and worker.case is not None:
            case, worker.case = worker.case, None
            self.finished += 1
            _, error, text, code = rest
            record_failure(self.result, self.events, case.case, (error, text, code), worker=self._label(worker))
        elif kind == "warning":
            self.events.warning(rest[0], rest[1])
        elif kind == "retry":
            self.events.case_retry(rest[0], rest[1], rest[2])
        elif kind == "windows":
            self.events.windows(rest[0], rest[1])

    def _check_alive(self) -> None:
        """A dead worker's case goes back to the queue once; the worker is replaced."""
        for name, worker in list(self.workers.items()):
            if worker.process.is_alive():
                continue
            for message in self._drain(worker):  # what it sent before it ended
                self._handle(message)
            del self.workers[name]
            worker.messages.close()
            if not worker.ready:  # it never started: its init_failed message said why
                if not self.init_errors:
                    raise DeviceError(f"worker {self._label(worker)} exited with code {worker.process.exitcode} "
                                      "while loading the model; expected it to start. Re-run with --debug.")
                continue
            self._lost(worker)
        if not self.workers and self.finished < self.total:
            raise _rebuild(*self.init_errors[0]) if self.init_errors else DeviceError(
                "every worker process ended; expected at least one to run the cases. Re-run with --debug.")

    def _lost(self, worker: _Worker) -> None:
        """A worker died while ready: retry its case once elsewhere, start a new worker."""
        from unisegcli.casework import record_failure

        case, code = worker.case, worker.process.exitcode
        if case is not None:
            deaths = self.deaths[case.case.case_id] = self.deaths.get(case.case.case_id, 0) + 1
            message = f"worker {self._label(worker)} died (exit code {code}) while segmenting '{case.case.case_id}'"
            if deaths == 1:
                self.events.case_retry(case.case.case_id, "worker_died", f"{message}; retrying once")
                self.pending.appendleft(case)
            else:
                self.finished += 1
                failure = DeviceError(f"{message}, for the second time; expected the case to run. Run it "
                                      "alone with --debug, or on --device cpu.")
                record_failure(self.result, self.events, case.case, failure, worker=self._label(worker))
        if self.finished < self.total:
            self._start(worker.spec)

    @staticmethod
    def _drain(worker: _Worker) -> list[tuple[Any, ...]]:
        messages = []
        try:
            while worker.messages.poll():
                messages.append(worker.messages.recv())
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        return messages

    def _label(self, worker: _Worker) -> str:
        return f"{worker.spec.name}@{worker.spec.device}"

    def _stop(self) -> None:
        """Ask every worker to finish; on an interrupt they get SIGTERM and clean up their case."""
        interrupted = self.finished < self.total
        for worker in self.workers.values():
            if worker.process.is_alive():
                if interrupted:
                    worker.process.terminate()
                else:
                    worker.inbox.put(None)
        for worker in self.workers.values():
            worker.process.join(STOP_GRACE_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()


def _rebuild(error: str, message: str, code: int | None = None) -> UnisegError:
    """A worker's error rebuilt in the parent: the same class when it is one of
    ``unisegcli.errors``, else a UnisegError with the same exit code."""
    import unisegcli.errors as errors

    cls = getattr(errors, error, None)
    if isinstance(cls, type) and issubclass(cls, UnisegError):
        return cls(message)
    exc = UnisegError(message)
    if code is not None:
        exc.exit_code = errors.ExitCode(code)
    return exc
