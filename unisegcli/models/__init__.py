"""Model cards, the registry, weights cache and downloader, and the networks.

Heavy submodules (torch) are imported lazily so that `uniseg --help`/`uniseg tasks` stay fast:
``from unisegcli.models import load_uniseg`` imports the network code on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_uniseg"]


def __getattr__(name: str) -> Any:
    if name == "load_uniseg":
        from unisegcli.models.uniseg import load_uniseg

        return load_uniseg
    raise AttributeError(f"module 'unisegcli.models' has no attribute {name!r}")
