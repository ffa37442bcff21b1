"""Run reporting for `uniseg segment`: progress bars and a summary table on stderr, or
JSON-lines events on stdout with --json (schema in README.md, "JSON events"). Silent under
--quiet except for errors.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from unisegcli.cli import console
from unisegcli.events import Events
from unisegcli.results import CaseFailure, CaseResult, Result

if TYPE_CHECKING:
    from pathlib import Path

    from unisegcli.io.discovery import CaseInput
    from unisegcli.weights.cards import ModelCard, TaskCard


def _rate_column() -> Any:
    """A column showing items per second (windows/s, cases/s), blank until measurable."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f}/s" if speed else "", style="progress.data.speed")

    return RateColumn()


def emit(event: str, **fields: Any) -> None:
    """One JSON object per line on stdout (flushed: consumers read it as a stream)."""
    sys.stdout.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
    sys.stdout.flush()


def _worker_fields(worker: str | None) -> dict[str, str]:
    """{"worker": "w1", "device": "cuda:1"} for case events of worker processes, else nothing."""
    if worker is None:
        return {}
    name, _, device = worker.partition("@")
    return {"worker": name, "device": device}


class RunReporter(Events):
    """Drives a rich progress display (cases and windows, with rate and ETA) or JSON events."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._cases_task: Any = None
        self._windows_task: Any = None
        self._started = time.perf_counter()
        self.result: Result | None = None  # set by run_finished, also when a run is interrupted
        self._download_bar: console.DownloadBar | None = None

    def download_progress(self, name: str, done_bytes: int, total_bytes: int | None) -> None:
        if self._download_bar is None:
            self._download_bar = console.DownloadBar(quiet=console.state.silent)
        self._download_bar(name, done_bytes, total_bytes)

    def downloading(self, model: "ModelCard") -> None:
        if console.state.json:
            emit("download_started", model=model.name, version=model.version, license=model.license)
        if not console.state.quiet:
            console.stderr().print(
                f"downloading model '{model.name}' {model.version} (first use) · license: {model.license}",
                soft_wrap=True, highlight=False, markup=False,
            )

    def run_started(self, model: "ModelCard", tasks: Sequence["TaskCard"], cases: Sequence["CaseInput"], device: str) -> None:
        if self._download_bar is not None:
            self._download_bar.close()
            self._download_bar = None
        if console.state.json:
            emit("run_started", model=model.name, version=model.version, tasks=[t.name for t in tasks],
                 cases=len(cases), device=device)
        if console.state.silent:
            return
        err = console.stderr()
        if model.note:
            err.print(f"[yellow]{model.name}:[/] {model.note}")
        if console.state.verbose:
            err.print(f"model {model.name} {model.version} · tasks {', '.join(t.name for t in tasks)} · "
                      f"{len(cases)} case(s) · device {device}")
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _rate_column(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,  # the summary table replaces the bars; an error leaves one line
        )
        self._progress.start()
        self._cases_task = self._progress.add_task("cases", total=len(cases))
        self._windows_task = self._progress.add_task("windows", total=None)

    def case_started(self, case: "CaseInput", number: int, total: int, worker: str | None = None) -> None:
        if console.state.json:
            emit("case_started", case_id=case.case_id, input=str(case.path), number=number, total=total,
                 **_worker_fields(worker))
        if self._progress is not None:
            self._progress.reset(self._windows_task, total=None, description=f"windows [dim]{case.case_id}[/]")

    def case_retry(self, case_id: str, reason: str, message: str) -> None:
        if console.state.json:
            emit("case_retry", case_id=case_id, reason=reason, message=message)
        elif not console.state.quiet:
            printer = self._progress.console if self._progress is not None else console.stderr()
            from rich.markup import escape

            printer.print(f"[yellow]retry:[/] {escape(case_id)}: {escape(message)}", soft_wrap=True)

    def windows(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._windows_task, completed=done, total=total)

    def case_done(self, result: CaseResult) -> None:
        if console.state.json:
            emit("case_done", case_id=result.case_id, output_dir=str(result.output_dir),
                 outputs={k: str(v) for k, v in result.masks.items()},
                 files=[str(p) for p in result.files],
                 volumes_ml={k: round(v, 3) for k, v in result.volumes_ml.items()},
                 seconds=round(result.seconds, 3), timings={k: round(v, 3) for k, v in result.timings.items()},
                 flags=result.flags, input_series=result.input_series, **_worker_fields(result.worker), **({"compare": result.compare} if result.compare else {}))
        elif not console.state.quiet and result.input_series:  # which DICOM series was taken, and why
            from rich.markup import escape

            printer = self._progress.console if self._progress is not None else console.stderr()
            for series in result.input_series:
                printer.print(f"[cyan]series:[/] {escape(result.case_id)}: {escape(series['summary'])}", soft_wrap=True)
        if self._progress is not None:
            self._progress.advance(self._cases_task)
            if console.state.verbose:
                self._progress.console.print(f"{result.case_id}: {result.seconds:.1f} s")

    def case_skipped(self, case: "CaseInput", folder: "Path") -> None:
        if console.state.json:
            emit("case_skipped", case_id=case.case_id, output_dir=str(folder), reason="done by an earlier run")
        if self._progress is not None:
            self._progress.advance(self._cases_task)

    def case_failed(self, failure: CaseFailure) -> None:
        if console.state.json:
            emit("case_failed", case_id=failure.case_id, input=str(failure.input_path), error=failure.error,
                 message=failure.message, exit_code=failure.exit_code, **_worker_fields(failure.worker))
        if self._progress is not None:
            self._progress.advance(self._cases_task)
        if not console.state.json:
            console.error_line(f"case '{failure.case_id}' failed: {failure.message}")

    def warning(self, case_id: str, message: str) -> None:
        if console.state.json:
            emit("warning", case_id=case_id, message=message)
        elif not console.state.quiet:
            printer = self._progress.console if self._progress is not None else console.stderr()
            from rich.markup import escape

            printer.print(f"[yellow]warning:[/] {escape(case_id)}: {escape(message)}", soft_wrap=True)

    def run_finished(self, result: Result) -> None:
        self.result = result
        self.close()
        if console.state.json:
            emit("run_finished", done=len(result.cases), skipped=len(result.skipped), failed=len(result.failures),
                 interrupted=result.interrupted, exit_code=int(result.exit_code),
                 seconds=round(time.perf_counter() - self._started, 3))

    def close(self) -> None:
        """Stop the live display (idempotent; also called when a run raises)."""
        if self._download_bar is not None:
            self._download_bar.close()
            self._download_bar = None
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def summary(self, result: Result) -> None:
        """Structures and volumes per case, then the done/skipped/failed counts (stderr)."""
        if console.state.silent:
            return
        from rich.table import Table

        err = console.stderr()
        if result.cases:
            table = Table(title=f"uniseg · model {result.model.name} {result.model.version} · {result.device}")
            for col, justify in (("case", "left"), ("structure", "left"), ("volume ml", "right"), ("file", "left")):
                table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
            for case in result.cases:
                for name, path in case.masks.items():
                    table.add_row(case.case_id, name, f"{case.volumes_ml[name]:.1f}", str(path))
            err.print(table)
        err.print(f"done {len(result.cases)} · skipped {len(result.skipped)} · failed {len(result.failures)}"
                  + (f" (see {result.output / 'failures.jsonl'})" if result.failures else "")
                  + f" · output {result.output}")
