"""UniSeg (MICCAI 2023): the network, its config and the checkpoint loader.

    from unisegcli.models.uniseg import load_uniseg
    net = load_uniseg("model_final_checkpoint.model", "plans.pkl")   # eval, fp32, CPU
    logits = net(x, task_index)          # x [B, C, *patch] -> [B, 4, *patch]

Heavy modules (torch) load on first attribute access, so importing the family module (for
`uniseg tasks`, task resolution) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "InputChannelsError": "network",
    "PatchSizeError": "network",
    "UniSegConfig": "config",
    "UniSegFeatures": "network",
    "UniSegNet": "network",
    "load_uniseg": "loader",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'unisegcli.models.uniseg' has no attribute {name!r}")
    return getattr(importlib.import_module(f"unisegcli.models.uniseg.{_HOMES[name]}"), name)
