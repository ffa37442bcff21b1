"""Convert a UniSeg checkpoint (nnU-Net v1 ``.model`` + plans) into ``model.safetensors`` and
``config.json``, which load later without any pickle (``uniseg weights convert``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unisegcli.io.atomic import staged_files
from unisegcli.io.hashing import sha256_file
from unisegcli.io.nifti import check_output_dir
from unisegcli.models.uniseg.loader import resolve_config
from unisegcli.models.uniseg.network import UniSegNet
from unisegcli.weights.checkpoint import CONFIG_NAME, SAFETENSORS_NAME, check_state_dict, load_state_dict


def convert_checkpoint(
    checkpoint: str | Path, plans: str | Path | None, out_dir: str | Path
) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for a UniSeg checkpoint.

    checkpoint: nnU-Net v1 ``.model`` (or a state dict / ``.safetensors``); plans: its
    ``plans.pkl`` (None: ``<checkpoint>.pkl`` beside it). The weights are checked against the
    network the plans describe before anything is written; the config is ``UniSegConfig.
    to_dict()``. Returns the path of ``model.safetensors``. Loading the result later needs
    no pickle at all.
    """
    from safetensors.torch import save_file

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    config = resolve_config(checkpoint, plans)
    state = load_state_dict(checkpoint)
    with torch.device("meta"):
        expected = UniSegNet(config).state_dict()
    check_state_dict(state, expected, checkpoint.name)
    tensors = {k: state[k].detach().contiguous() for k in expected}
    metadata = {
        "format": "pt",
        "family": "uniseg",
        "source_name": checkpoint.name,
        "source_sha256": sha256_file(checkpoint),
    }
    check_output_dir(out_dir)
    # Both files appear together or not at all (staged under temp names, then renamed).
    with staged_files(out_dir) as stage:
        save_file(tensors, str(stage(SAFETENSORS_NAME)), metadata=metadata)
        stage(CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out_dir / SAFETENSORS_NAME
