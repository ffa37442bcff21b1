"""Where the CLI writes: human text on stderr (rich), machine events on stdout.

Holds the per-invocation output state (quiet, json, debug) that the error handler and the
progress display read. Library code never prints; it gets a progress callback instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class OutputState:
    """Flags of the running command; set by the command before it calls the library."""

    quiet: bool = False
    json: bool = False
    debug: bool = False
    verbose: bool = False

    @property
    def silent(self) -> bool:
        """No progress bars or tables: --quiet, or --json (stdout is for events then)."""
        return self.quiet or self.json


state = OutputState()
_consoles: dict[str, "Console"] = {}


def stderr() -> "Console":
    """The rich console on stderr (human output, progress, errors)."""
    if "err" not in _consoles:
        from rich.console import Console

        _consoles["err"] = Console(stderr=True, highlight=False)
    return _consoles["err"]


def stdout() -> "Console":
    """The rich console on stdout (tables of `tasks`, `models`, ...)."""
    if "out" not in _consoles:
        from rich.console import Console

        _consoles["out"] = Console(highlight=False)
    return _consoles["out"]


def reset() -> None:
    """Forget consoles and flags (each CliRunner invocation swaps the std streams)."""
    _consoles.clear()
    state.quiet = state.json = state.debug = state.verbose = False


def error_line(message: str) -> None:
    """One red line on stderr: the whole error report a user sees without --debug."""
    from rich.markup import escape

    stderr().print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)


def warn_line(message: str) -> None:
    """One yellow line on stderr, unless --quiet/--json."""
    if state.silent:
        return
    from rich.markup import escape

    stderr().print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


class DownloadBar:
    """A rich bar per downloaded file (size, speed, ETA) on stderr, fed by the library's
    ``progress(name, bytes so far, total)`` callback; draws nothing when ``quiet``."""

    def __init__(self, console: "Console | None" = None, quiet: bool = False) -> None:
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        if quiet:
            return
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                             TransferSpeedColumn(), TimeRemainingColumn(), console=console or stderr(),
                             transient=False)

    def __call__(self, name: str, done: int, total: int | None) -> None:
        if self._bar is None:
            return
        if name not in self._tasks:
            self._bar.start()
            self._tasks[name] = self._bar.add_task(name, total=None)
        self._bar.update(self._tasks[name], completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None and self._tasks:
            self._bar.stop()

    def __enter__(self) -> "DownloadBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
