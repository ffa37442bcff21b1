"""The shape of a UniSeg network: a frozen dataclass read from nnU-Net v1 plans or JSON.

Everything that decides the state-dict keys and shapes of ``UniSegNet`` lives here, so a
checkpoint can be checked against its config before any weight is touched.

Facts from yeerwen/UniSeg (commit e3ae40de):
- ``Upstream/nnunet/training/network_training/UniSeg_Trainer.py``: 11 tasks, input-channel
  options [1, 2, 4], ``num_classes = plans['num_classes'] + 1``, feature growth x2 per stage.
- ``Upstream/nnunet/training/network_training/nnUNetTrainer.py`` (``process_plans``): patch,
  pool and conv kernels from ``plans_per_stage[stage]``; ``conv_per_stage`` defaults to 2.
- ``Upstream/nnunet/network_architecture/Prompt_generic_UNet.py``: feature widths capped by
  ``max_num_features`` (nnU-Net v1's ``MAX_NUM_FILTERS_3D`` = 320 when not given); the prompt's
  spatial shape is ``patch // (16, 32, 32)``, hard-coded, not derived from the pool kernels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from unisegcli.errors import CheckpointError

Triple = tuple[int, int, int]

DEFAULT_MAX_NUM_FEATURES = 320  # nnU-Net v1 Generic_UNet.MAX_NUM_FILTERS_3D
# The prompt's spatial size is patch // these divisors (z, y, x), hard-coded upstream.
PROMPT_DIVISORS: Triple = (16, 32, 32)


def _triple(value: Any, what: str) -> Triple:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"UniSegConfig.{what} must be 3 integers (z, y, x), got {value!r}") from exc
    if len(out) != 3:
        raise ValueError(f"UniSegConfig.{what} must be 3 integers (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True, kw_only=True)
class UniSegConfig:
    """Constructor arguments of a UniSeg network (all sizes in (z, y, x) order).

    patch_size: the window size in voxels; every input must have exactly this size.
    base_num_features: features of the first stage; doubled per stage up to max_num_features.
    pool_op_kernel_sizes: one stride triple per downsampling (the number of pools).
    conv_kernel_sizes: one kernel triple per resolution (number of pools + 1); entries 1 or 3.
    num_tasks: number of task prompts. num_classes: output channels shared by all tasks.
    input_channel_options: the first conv exists once per option (``conv_1``, ``conv_2``, ...).
    conv_per_stage: conv blocks per encoder/decoder stage (nnU-Net v1 plans; 2 for UniSeg).
    """

    patch_size: Triple
    base_num_features: int
    max_num_features: int = DEFAULT_MAX_NUM_FEATURES
    pool_op_kernel_sizes: tuple[Triple, ...]
    conv_kernel_sizes: tuple[Triple, ...]
    num_tasks: int = 11
    num_classes: int = 4
    input_channel_options: tuple[int, ...] = (1, 2, 4)
    conv_per_stage: int = 2

    def __post_init__(self) -> None:
        # Normalise lists (JSON, plans) to tuples so configs compare and hash by value.
        set_ = object.__setattr__
        set_(self, "patch_size", _triple(self.patch_size, "patch_size"))
        pools = tuple(_triple(p, "pool_op_kernel_sizes[]") for p in self.pool_op_kernel_sizes)
        convs = tuple(_triple(k, "conv_kernel_sizes[]") for k in self.conv_kernel_sizes)
        set_(self, "pool_op_kernel_sizes", pools)
        set_(self, "conv_kernel_sizes", convs)
        set_(self, "input_channel_options", tuple(int(c) for c in self.input_channel_options))
        for name in ("base_num_features", "max_num_features", "num_tasks", "num_classes", "conv_per_stage"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"UniSegConfig.{name} must be a positive integer, got {value!r}")
            set_(self, name, int(value))
        self._validate()

    def _validate(self) -> None:
        pools, convs = self.pool_op_kernel_sizes, self.conv_kernel_sizes
        if not pools:
            raise ValueError("UniSegConfig.pool_op_kernel_sizes must name at least one pooling")
        if len(convs) != len(pools) + 1:
            raise ValueError(
                f"UniSegConfig needs one conv kernel per resolution: {len(pools)} poolings give "
                f"{len(pools) + 1} resolutions, got {len(convs)} conv_kernel_sizes"
            )
        if any(k not in (1, 3) for kernel in convs for k in kernel):
            # nnU-Net v1 pads 1 for a 3 and 0 for anything else, so other sizes would shrink
            # the maps and break the skip concatenation; its planner only emits 1 and 3.
            raise ValueError(f"UniSegConfig.conv_kernel_sizes entries must be 1 or 3, got {convs}")
        if any(s < 1 for pool in pools for s in pool):
            raise ValueError(f"UniSegConfig.pool_op_kernel_sizes must be positive, got {pools}")
        if not self.input_channel_options or len(set(self.input_channel_options)) != len(
            self.input_channel_options
        ) or min(self.input_channel_options) < 1:
            raise ValueError(
                f"UniSegConfig.input_channel_options must be distinct positive channel counts, "
                f"got {self.input_channel_options}"
            )
        total = tuple(math.prod(p[axis] for p in pools) for axis in range(3))
        if any(s % t for s, t in zip(self.patch_size, total)):
            raise ValueError(
                f"UniSegConfig.patch_size {self.patch_size} must be divisible by the total "
                f"downsampling {total} (z, y, x)"
            )
        if self.bottleneck_shape != self.prompt_shape:
            raise ValueError(
                f"UniSeg's prompt has the fixed size patch // {PROMPT_DIVISORS} = "
                f"{self.prompt_shape}, but the pool kernels give a bottleneck of "
                f"{self.bottleneck_shape} (z, y, x); upstream cannot run this combination"
            )

    # -- derived sizes -------------------------------------------------------------------

    @property
    def num_pool(self) -> int:
        return len(self.pool_op_kernel_sizes)

    @property
    def stage_features(self) -> tuple[int, ...]:
        """Features per resolution, full resolution first, bottleneck last (num_pool + 1).

        Upstream doubles (rounded) and caps after each stage; the first stage is not capped.
        """
        widths = [self.base_num_features]
        for _ in range(self.num_pool):
            # upstream: round(f * 2) then cap, applied cumulatively
            widths.append(min(int(round(widths[-1] * 2)), self.max_num_features))
        return tuple(widths)

    @property
    def bottleneck_shape(self) -> Triple:
        total = [math.prod(p[axis] for p in self.pool_op_kernel_sizes) for axis in range(3)]
        return tuple(s // t for s, t in zip(self.patch_size, total))  # type: ignore[return-value]

    @property
    def prompt_shape(self) -> Triple:
        """Spatial size (z, y, x) of ``intermedia_prompt`` = patch // (16, 32, 32)."""
        return tuple(s // d for s, d in zip(self.patch_size, PROMPT_DIVISORS))  # type: ignore[return-value]

    @property
    def fusion_channels(self) -> tuple[int, int, int, int]:
        """Channels through the fusion module: (C + T) -> (C + T) // 4 -> same -> T."""
        c_in = self.stage_features[-1] + self.num_tasks
        return (c_in, c_in // 4, c_in // 4, self.num_tasks)

    # -- constructors ----------------------------------------------------------------------

    @classmethod
    def default(cls) -> UniSegConfig:
        """The released 11-task model: patch 64x192x192, features 32..320, 4 outputs."""
        return cls(
            patch_size=(64, 192, 192),
            base_num_features=32,
            max_num_features=DEFAULT_MAX_NUM_FEATURES,
            pool_op_kernel_sizes=((1, 2, 2),) + ((2, 2, 2),) * 4,
            conv_kernel_sizes=((1, 3, 3),) + ((3, 3, 3),) * 5,
        )

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any], stage: int | None = 0) -> UniSegConfig:
        """Build the config the UniSeg trainer builds from an nnU-Net v1 plans dict.

        stage: key of ``plans_per_stage`` (None = the last stage, nnU-Net v1's 3d_fullres).
        Raises CheckpointError naming the missing or malformed entry.
        """
        if not isinstance(plans, Mapping):
            raise CheckpointError(f"plans must be a dict, got {type(plans).__name__}")
        stages = _plans_entry(plans, "plans_per_stage")
        if not isinstance(stages, Mapping) or not stages:
            raise CheckpointError("plans: 'plans_per_stage' must be a non-empty dict")
        if stage is None:
            stage = sorted(stages)[-1]
        if stage not in stages:
            raise CheckpointError(
                f"plans: stage {stage} not in plans_per_stage (stages: {sorted(stages)})"
            )
        per_stage = stages[stage]
        try:
            return cls(
                patch_size=_plans_entry(per_stage, "patch_size", f"plans_per_stage[{stage}]"),
                base_num_features=_plans_entry(plans, "base_num_features"),
                max_num_features=plans.get("max_num_features") or DEFAULT_MAX_NUM_FEATURES,
                pool_op_kernel_sizes=_plans_entry(
                    per_stage, "pool_op_kernel_sizes", f"plans_per_stage[{stage}]"
                ),
                conv_kernel_sizes=_plans_entry(
                    per_stage, "conv_kernel_sizes", f"plans_per_stage[{stage}]"
                ),
                # the plans count foreground classes only
                num_classes=int(_plans_entry(plans, "num_classes")) + 1,
                conv_per_stage=plans.get("conv_per_stage") or 2,
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"plans do not describe a UniSeg network: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UniSegConfig:
        """Inverse of ``to_dict`` (registry "network" entry, ``config.json``).

        Keys are the field names; optional fields may be left out. Unknown keys raise
        ValueError, so a typo does not silently build a different network.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"UniSeg network config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"UniSeg network config has unknown keys {unknown}; known: {sorted(names)}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with exactly the field names as keys (tuples become lists)."""
        def listify(value: Any) -> Any:
            return [listify(v) for v in value] if isinstance(value, tuple) else value

        return {k: listify(v) for k, v in asdict(self).items()}


def _plans_entry(plans: Mapping[str, Any], key: str, where: str = "plans") -> Any:
    if key not in plans:
        raise CheckpointError(
            f"{where} has no '{key}'; expected an nnU-Net v1 plans file (plans.pkl) of UniSeg"
        )
    return plans[key]
