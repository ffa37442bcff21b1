"""Run reporting for `uniseg segment`: progress bars and a summary table on stderr, or
JSON-lines events on stdout with --json. Silent under --quiet.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any, Sequence

from unisegcli.api import CaseResult, Events, Result
from unisegcli.cli import console

if TYPE_CHECKING:
    from unisegcli.io.discovery import CaseInput
    from unisegcli.models.cards import ModelCard, TaskCard


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


class RunReporter(Events):
    """Drives a rich progress display (cases and windows, with rate and ETA) or JSON events."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._cases_task: Any = None
        self._windows_task: Any = None

    def run_started(self, model: "ModelCard", tasks: Sequence["TaskCard"], cases: Sequence["CaseInput"], device: str) -> None:
        if console.state.json:
            emit("run_started", model=model.name, version=model.version, tasks=[t.name for t in tasks],
                 cases=len(cases), device=device)
        if model.note and not console.state.silent:
            console.stderr().print(f"[yellow]{model.name}:[/] {model.note}")
        if console.state.silent:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _rate_column(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console.stderr(),
            transient=False,
        )
        self._progress.start()
        self._cases_task = self._progress.add_task("cases", total=len(cases))
        self._windows_task = self._progress.add_task("windows", total=None)

    def case_started(self, case: "CaseInput", number: int, total: int) -> None:
        if console.state.json:
            emit("case_started", case_id=case.case_id, input=str(case.path), number=number, total=total)
        if self._progress is not None:
            self._progress.update(self._windows_task, completed=0, total=None,
                                  description=f"windows [dim]{case.case_id}[/]")

    def windows(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._windows_task, completed=done, total=total)

    def case_done(self, result: CaseResult) -> None:
        if console.state.json:
            emit("case_done", case_id=result.case_id, outputs={k: str(v) for k, v in result.masks.items()},
                 volumes_ml={k: round(v, 3) for k, v in result.volumes_ml.items()},
                 seconds=round(result.seconds, 3))
        if self._progress is not None:
            self._progress.advance(self._cases_task)

    def run_finished(self, result: Result) -> None:
        if self._progress is not None:
            self._progress.stop()
        if console.state.json:
            emit("run_finished", done=len(result.cases), failed=0, skipped=0)

    def summary(self, result: Result) -> None:
        """The table of structures and volumes at the end of a run (stderr)."""
        if console.state.silent:
            return
        from rich.table import Table

        table = Table(title=f"uniseg · model {result.model.name} {result.model.version} · {result.device}")
        for col, justify in (("case", "left"), ("structure", "left"), ("volume ml", "right"), ("mask", "left")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for case in result.cases:
            for name, path in case.masks.items():
                table.add_row(case.case_id, name, f"{case.volumes_ml[name]:.1f}", str(path))
        console.stderr().print(table)
