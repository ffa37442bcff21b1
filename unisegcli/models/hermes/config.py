"""``HermesConfig``: the constructor arguments of Hermes' ``Hermes_UNet`` as data.

Facts (read from yhygao/universal-medical-image-segmentation @ 033e16ae,
``model/dim3/hermes_unet.py`` and ``config/universal/hermes_resunet_3d.yaml``): the released
Hermes-R network is ``Hermes_UNet(in_ch=1, base_ch=32, scale=[[2,2,2]]*4,
kernel_size=[[3,3,3]]*5, block='BasicBlock', num_block=[2,2,2,2], norm='in', tn=72, mn=6)``.
Level widths are base·(1, 2, 4, 8, 10) (32, 64, 128, 256, 320); the five context-prior fusion
layers sit after down2, down3, down4, up1 and up2 with 2, 2, 4, 2, 2 attention blocks; every
attention head is 32 channels wide; the task prior table has tn + 1 rows (71 tasks, an unused
row 71 and the null token at row 72 that index -1 selects).

A config can also be read back from a state dict (``from_state_dict``), so a checkpoint of
another width or kernel layout (such as the parity fixture's) builds the matching network.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    import torch

Triple = tuple[int, int, int]

LEVEL_MULTIPLIERS = (1, 2, 4, 8, 10)  # hermes_unet.py: base_ch * 1, 2, 4, 8, 10
DIM_HEAD = 32  # every attention head is 32 channels wide (heads = width // 32)
MODALITY_TOKENS = 10  # modality_prior rows hold 10 tokens each
# Fusion layers: name -> (encoder/decoder level whose width they use).
FUSION_LAYERS = (
    ("prior_init_fuse_2", 2),
    ("prior_init_fuse_3", 3),
    ("prior_init_fuse_4", 4),
    ("prior_fuse_5", 3),
    ("prior_fuse_6", 2),
)


@dataclass(frozen=True)
class HermesConfig:
    """What ``HermesUNet`` needs to rebuild ``Hermes_UNet`` key for key.

    kernel_sizes: (z, y, x) kernel per level 0..4 (inc/up4 use level 0, downN/up(4-N+1) use
    level N). down_scales: max-pool kernel of down1..down4. down_blocks / up_blocks:
    BasicBlocks per stage (down1..4, up1..4). fusion_blocks: attention blocks of the five
    fusion layers in ``FUSION_LAYERS`` order. num_tasks: ``tn`` (the task prior has tn + 1
    rows). num_modalities: ``mn`` (rows of the modality prior and modality logits).
    """

    in_channels: int = 1
    base_channels: int = 32
    kernel_sizes: tuple[Triple, ...] = ((3, 3, 3),) * 5
    down_scales: tuple[Triple, ...] = ((2, 2, 2),) * 4
    down_blocks: tuple[int, ...] = (2, 2, 2, 2)
    up_blocks: tuple[int, ...] = (2, 2, 2, 2)
    fusion_blocks: tuple[int, ...] = (2, 2, 4, 2, 2)
    num_tasks: int = 72
    num_modalities: int = 6

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of levels 0..4."""
        return tuple(self.base_channels * m for m in LEVEL_MULTIPLIERS)

    @property
    def fusion_widths(self) -> tuple[int, ...]:
        return tuple(self.widths[level] for _, level in FUSION_LAYERS)

    @property
    def classifier_width(self) -> int:
        """Concatenated task tokens of the five fusion layers (1088 for Hermes-R)."""
        return sum(self.fusion_widths)

    def to_dict(self) -> dict[str, Any]:
        return {k: [list(v) if isinstance(v, tuple) else v for v in val] if isinstance(val, tuple) else val
                for k, val in asdict(self).items()}

    @classmethod
    def from_upstream(cls, in_ch: int, base_ch: int, scale: Sequence[Any] = (2, 2, 2, 2),
                      kernel_size: Sequence[Any] = (3, 3, 3, 3, 3), num_block: Sequence[int] = (2, 2, 2, 2),
                      tn: int = 72, mn: int = 6) -> "HermesConfig":
        """The config of upstream ``Hermes_UNet(in_ch, base_ch, scale, kernel_size, block=
        'BasicBlock', num_block, pool=True, norm='in', tn, mn)``.

        Upstream's wiring (hermes_unet.py @ f4c84e1): downN uses kernel_size[N] and scale[N-1];
        up1, up2, up3 use num_block[2], [1], [0] and kernel_size[3], [2], [1]; up4 always has 2
        blocks and kernel_size[0]; an int kernel or scale means the same on every axis.
        """
        kernels = tuple(_triple(k) for k in kernel_size)
        if len(kernels) < 5:
            raise ValueError(f"kernel_size needs 5 levels (inc, down1..down4), got {len(kernels)}")
        blocks = tuple(int(n) for n in num_block)
        return cls(
            in_channels=int(in_ch),
            base_channels=int(base_ch),
            kernel_sizes=kernels[:5],
            down_scales=tuple(_triple(v) for v in scale),
            down_blocks=blocks,
            up_blocks=(blocks[2], blocks[1], blocks[0], 2),
            num_tasks=int(tn),
            num_modalities=int(mn),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HermesConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Hermes config fields {unknown}; expected some of {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("kernel_sizes", "down_scales"):
                values[key] = tuple(_triple(item) for item in value)
            elif key in ("down_blocks", "up_blocks", "fusion_blocks"):
                values[key] = tuple(int(v) for v in value)
            else:
                values[key] = int(value)
        return cls(**values)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, "torch.Tensor"]) -> "HermesConfig":
        """The config whose network has exactly these keys and shapes (checked afterwards).

        Raises ValueError when a key the architecture always has is missing.
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in state:
                raise ValueError(f"no '{key}' in the weights (not a Hermes_UNet state dict)")
            return tuple(state[key].shape)

        stem = shape("inc.conv1.weight")  # [base, in, kz, ky, kx]
        kernels = [tuple(stem[2:])]
        for n in range(1, 5):
            kernels.append(tuple(shape(f"down{n}.conv.1.conv1.conv.weight")[2:]))

        def count(pattern: str) -> int:
            found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
            return len(found)

        down_blocks = tuple(count(rf"down{n}\.conv\.(\d+)\.") for n in range(1, 5))
        up_blocks = tuple(count(rf"up{n}\.conv\.(\d+)\.") for n in range(1, 5))
        fusion_blocks = tuple(count(rf"{name}\.attn_layers\.(\d+)\.") for name, _ in FUSION_LAYERS)
        task_rows = shape("prior_init_fuse_2.task_prior")[0]
        modality_rows = shape("prior_init_fuse_2.modality_prior")[0]
        return cls(
            in_channels=stem[1],
            base_channels=stem[0],
            kernel_sizes=tuple(kernels),  # type: ignore[arg-type]
            down_blocks=down_blocks,
            up_blocks=up_blocks,
            fusion_blocks=fusion_blocks,
            num_tasks=task_rows - 1,
            num_modalities=modality_rows,
        )


def _triple(value: Any) -> Triple:
    """An int or a 3-sequence as a (z, y, x) triple."""
    if isinstance(value, int):
        return (value, value, value)
    items = tuple(int(v) for v in value)
    if len(items) != 3:
        raise ValueError(f"expected an int or 3 values (z, y, x), got {value!r}")
    return items  # type: ignore[return-value]


RELEASED = HermesConfig()  # Hermes-R as released (hermes_resunet_3d.yaml)
