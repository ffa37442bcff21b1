"""The SAT family (text-prompted segmentation over a 498-term vocabulary).

``load_sat`` and the configs are imported lazily (they need torch), so that listing the
vocabulary (`uniseg tasks --model sat-nano`) stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NANO", "PRO", "SatConfig", "SatModel", "TextConfig", "load_sat"]


def __getattr__(name: str) -> Any:
    if name in ("NANO", "PRO", "SatConfig", "TextConfig"):
        from unisegcli.models.sat import config

        return getattr(config, name)
    if name in ("SatModel", "load_sat"):
        from unisegcli.models.sat import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'unisegcli.models.sat' has no attribute '{name}'")
