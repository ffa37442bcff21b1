"""Engine settings as one frozen value (the CLI's "Engine" options), checked before any work.

    EngineOptions(device="cuda:1", batch_size=4, precision="fp16")

``device`` runs the network; ``accumulator_device`` holds the blended outputs (None: the
network's device; "cpu": host memory, as MONAI's ``sw_device``/``device`` split). ``step``
None means the family's own overlap (0.5 for every family today). ``threads`` sets torch's
CPU threads for the life of a Segmenter and is restored when it closes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from unisegcli.errors import UsageError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EngineOptions:
    """How to run the network: device, accumulators, windows per forward, overlap, TTA, precision."""

    device: str = "auto"
    accumulator_device: str | None = None
    batch_size: int | None = None
    step: float | None = None
    tta: bool = False
    precision: str = "auto"
    threads: int | None = None

    def check(self) -> None:
        """Raise UsageError for values no run could use."""
        if self.step is not None and not (math.isfinite(self.step) and 0 < self.step <= 1):
            raise UsageError(f"--step is {self.step}; expected a fraction of the patch in (0, 1], e.g. 0.5.")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise UsageError(f"--batch-size is {self.batch_size}; expected 1 or more windows per forward.")
        if self.threads is not None and int(self.threads) < 1:
            raise UsageError(f"--threads is {self.threads}; expected 1 or more CPU threads.")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision '{self.precision}'; expected one of {', '.join(PRECISIONS)}.")
