"""Progress hooks of a run. The library never prints: it calls these, and the CLI subclasses
``Events`` for progress bars and JSON-lines events (README, "JSON events")."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from unisegcli.io.discovery import CaseInput
    from unisegcli.results import CaseFailure, CaseResult, Result
    from unisegcli.weights.cards import ModelCard, TaskCard


class Events:
    """Progress hooks the Segmenter calls; every hook is a no-op here."""

    def downloading(self, model: "ModelCard") -> None:
        """Before the first download of a model's weights (show its license)."""

    def download_progress(self, name: str, done_bytes: int, total_bytes: int | None) -> None:
        """Bytes of one weights file received so far (total None when the server does not say)."""

    def run_started(self, model: "ModelCard", tasks: Sequence["TaskCard"], cases: Sequence["CaseInput"],
                    device: str) -> None:
        """Before the first case."""

    def case_started(self, case: "CaseInput", number: int, total: int) -> None:
        """Before a case is predicted."""

    def windows(self, done: int, total: int) -> None:
        """Sliding-window progress inside the current case."""

    def case_retry(self, case_id: str, reason: str, message: str) -> None:
        """A case is predicted again with lighter settings (e.g. after a CUDA out-of-memory)."""

    def case_done(self, result: "CaseResult") -> None:
        """After all outputs of a case were written."""

    def case_skipped(self, case: "CaseInput", folder: Path) -> None:
        """A case already done by an earlier run (resume)."""

    def case_failed(self, failure: "CaseFailure") -> None:
        """A case failed; the batch goes on."""

    def warning(self, case_id: str, message: str) -> None:
        """A scan is legal but suspicious for its task (see preprocessing.sanity)."""

    def run_finished(self, result: "Result") -> None:
        """After the last case (also after an interrupt)."""
