"""Per-structure masks of a case, computed from its label maps on access (never stored)."""

from __future__ import annotations

from typing import Iterable, Iterator, Mapping

import numpy as np


class LabelMasks(Mapping[str, np.ndarray]):
    """Per-structure bool masks computed from label maps on each access, never stored.

    label_maps: task -> uint8 [Z, Y, X] label map; where: structure -> (task, label), in
    output order. A bool mask of a 512x512x400 scan is 105 MB, so a case with 11 structures
    would hold 1.2 GB of masks next to its label maps; ``label_map == label`` costs ~0.05 s
    there, cheaper than keeping it.
    """

    def __init__(self, label_maps: Mapping[str, np.ndarray], where: Mapping[str, tuple[str, int]]) -> None:
        self._label_maps = label_maps
        self._where = dict(where)

    def __getitem__(self, name: str) -> np.ndarray:
        task, label = self._where[name]
        return self._label_maps[task] == label

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def subset(self, names: Iterable[str]) -> "LabelMasks":
        """The masks of ``names`` only, in that order (still computed on access)."""
        return LabelMasks(self._label_maps, {n: self._where[n] for n in names})
