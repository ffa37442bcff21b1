"""Build the network an nnU-Net v2 plan describes and load each fold's weights.

As nnU-Net v2.8.1 ``utilities/get_network_from_plans.py``: the configuration's
``architecture`` names a class (``network_class_name``) and its keyword arguments
(``arch_kwargs``); the kwargs listed in ``_kw_requires_import`` hold dotted class names
(``torch.nn.modules.conv.Conv3d``). The network is
``cls(input_channels=C, num_classes=K, deep_supervision=False, **kwargs)``; the predictor
(``predict_from_raw_data.nnUNetPredictor.initialize_from_trained_model_folder``) then loads
``checkpoint["network_weights"]`` strictly and mirrors along
``checkpoint["inference_allowed_mirroring_axes"]`` (None: never).

Dotted names from a downloaded plans file are imported only below ``ALLOWED_PREFIXES``:
a plans file cannot make us import arbitrary code. Checkpoints are read by
``checkpoint.load_torch_file`` (``weights_only=True`` with the numpy allow-list nnU-Net's
``logging``/``_best_ema`` entries need).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from unisegcli.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from unisegcli.models.nnunet.folder import ResultsFolder

ALLOWED_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")
INSTALL_HINT = "Install the nnunet extra: pip install 'uniseg[nnunet]' (it brings dynamic-network-architectures)."


def locate(dotted: str) -> Any:
    """The object a dotted name from a plans file names, only from an allow-listed package."""
    if not isinstance(dotted, str) or not dotted.startswith(ALLOWED_PREFIXES) or ".." in dotted:
        raise CheckpointError(
            f"plans.json names class {dotted!r}; expected a class from "
            f"{' or '.join(p.rstrip('.') for p in ALLOWED_PREFIXES)}. Other classes are refused: "
            "a plans file must not make uniseg import arbitrary code."
        )
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        _check_located(dotted, obj)
        return obj
    raise CheckpointError(
        f"plans.json names class {dotted!r}, which this installation does not have; expected a class "
        f"of the installed dynamic_network_architectures/torch. {INSTALL_HINT}"
    )


def _check_located(dotted: str, obj: Any) -> None:
    """Only torch modules (classes) defined in the allowed packages: a name must not reach other
    code through a module's imports (``torch.nn.functional.torch.load``)."""
    from torch import nn

    home = getattr(obj, "__module__", "") or ""
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)
            and home.startswith(tuple(p.rstrip(".") for p in ALLOWED_PREFIXES))):
        raise CheckpointError(
            f"plans.json names {dotted!r}, which is not a network layer class of "
            f"{' or '.join(p.rstrip('.') for p in ALLOWED_PREFIXES)}; refused. Use the plans nnU-Net wrote."
        )


def build_network(architecture: Mapping[str, Any], in_channels: int, num_outputs: int) -> "nn.Module":
    """The plans' network (random weights, train mode) for ``in_channels`` inputs, ``num_outputs`` outputs."""
    kwargs = dict(architecture.get("arch_kwargs") or {})
    for key in architecture.get("_kw_requires_import") or ():
        if kwargs.get(key) is not None:
            kwargs[key] = locate(kwargs[key])
    cls = locate(architecture["network_class_name"])
    try:
        return cls(input_channels=in_channels, num_classes=num_outputs, deep_supervision=False, **kwargs)
    except TypeError as exc:
        raise CheckpointError(
            f"cannot build {architecture['network_class_name']} from plans.json ({exc}); expected "
            f"arch_kwargs this dynamic_network_architectures accepts. {INSTALL_HINT}"
        ) from exc


class SliceNetwork:
    """A 2D nnU-Net network as a [B, C, 1, Y, X] -> [B, K, 1, Y, X] predictor for the 3D engine
    (nnU-Net's 2D configurations predict slice by slice along axis 0)."""

    def __init__(self, net: "nn.Module") -> None:
        self.net = net

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        return self.net(x[:, :, 0])[:, :, None]


@dataclass
class Fold:
    """One trained fold: its network (eval mode) and the axes it may be mirrored along."""

    name: str
    network: "nn.Module"
    mirror_axes: tuple[int, ...] | None


def load_fold(folder: "ResultsFolder", fold: str) -> Fold:
    """Build the network and load fold ``fold`` of ``folder`` (CPU, eval mode)."""
    from unisegcli.weights.checkpoint import check_state_dict, load_torch_file

    path = folder.folds[fold]
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("network_weights"), Mapping):
        raise CheckpointError(
            f"{path} has no 'network_weights'; expected a checkpoint written by nnU-Net v2's trainer. "
            "Copy fold_*/checkpoint_final.pth from the results folder again."
        )
    net = build_network(folder.configuration["architecture"], len(folder.channel_names), folder.num_outputs)
    state = dict(checkpoint["network_weights"])
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    check_state_dict(state, net.state_dict(), f"{path.parent.name}/{path.name}")
    net.load_state_dict(state, strict=True)
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return Fold(fold, net.eval(), tuple(int(a) for a in axes) if axes is not None else None)


def select_folds(folder: "ResultsFolder", requested: Sequence[int] | None) -> list[str]:
    """The folds to average: ``--folds`` if given (each must exist), else every trained fold."""
    if requested is None:
        return list(folder.folds)
    names = [str(f) for f in requested]
    missing = [n for n in names if n not in folder.folds]
    if missing or not names:
        raise UsageError(
            f"--folds {','.join(names) or '(none)'}: fold(s) {', '.join(missing) or '(none)'} not in "
            f"{folder.path}; expected some of {', '.join(folder.folds)}. Pick folds that have "
            "fold_N/checkpoint_final.pth."
        )
    return names


class FoldAverage:
    """Several folds as one predictor: the mean of their logits per window.

    Blending is linear, so averaging per window equals nnU-Net's average of the per-fold
    blended logits (up to float32 rounding); the float16-exact mode runs folds one by one.
    """

    def __init__(self, predictors: Sequence[Any]) -> None:
        self.predictors = list(predictors)

    def __call__(self, x: "torch.Tensor") -> "torch.Tensor":
        total = None
        for p in self.predictors:
            out = p(x).float()
            total = out if total is None else total + out
        assert total is not None
        return total / len(self.predictors)


def parameter_count(net: "nn.Module") -> int:
    """Distinct parameters of a network (aliased modules counted once)."""
    return sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())

