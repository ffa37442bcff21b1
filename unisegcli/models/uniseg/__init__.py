"""UniSeg (MICCAI 2023): the network, its config and the checkpoint loader.

    from unisegcli.models.uniseg import load_uniseg
    net = load_uniseg("model_final_checkpoint.model", "plans.pkl")   # eval, fp32, CPU
    logits = net(x, task_index)          # x [B, C, *patch] -> [B, 4, *patch]
"""

from __future__ import annotations

from unisegcli.models.uniseg.config import UniSegConfig
from unisegcli.models.uniseg.loader import load_uniseg
from unisegcli.models.uniseg.network import (
    InputChannelsError,
    PatchSizeError,
    UniSegFeatures,
    UniSegNet,
)

__all__ = [
    "InputChannelsError",
    "PatchSizeError",
    "UniSegConfig",
    "UniSegFeatures",
    "UniSegNet",
    "load_uniseg",
]
