"""preprocessing stage: crop, resample, normalise — each step recorded so it can be undone."""

from __future__ import annotations

from unisegcli.preprocessing.pipeline import preprocess, preprocess_volume
from unisegcli.preprocessing.trace import Trace

__all__ = ["Trace", "preprocess", "preprocess_volume"]
