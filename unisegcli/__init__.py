"""uniseg: run universal medical-image segmentation models on CT, MR and PET scans.

    from unisegcli import Segmenter
    with Segmenter("uniseg", "liver,kidney") as seg:
        seg.predict("scan.nii.gz").masks["liver"]
"""

from __future__ import annotations

from typing import Any

from unisegcli.version import __version__
__all__ = ["Combination", "EngineOptions", "OutputOptions", "Segmentation", "Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `uniseg --help` does not import numpy/torch through the session.
    if name == "Segmenter":
        from unisegcli.session import Segmenter

        return Segmenter
    if name == "Combination":
        from unisegcli.combination import Combination

        return Combination
    if name == "Segmentation":
        from unisegcli.results import Segmentation

        return Segmentation
    if name == "EngineOptions":
        from unisegcli.settings import EngineOptions

        return EngineOptions
    if name == "OutputOptions":
        from unisegcli.outputs.writer import OutputOptions

        return OutputOptions
    raise AttributeError(f"module 'unisegcli' has no attribute {name!r}")
