"""Split the sorted case list between the tasks of a job array (``--shard I/N``, 1-based).

Case k of the sorted list (0-based) belongs to shard ``k mod N + 1``: deterministic,
disjoint, complete, and balanced to within one case. Without ``--shard``, Slurm's array
variables decide: I = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN + 1 and
N = SLURM_ARRAY_TASK_COUNT (so ``--array=0-9`` and ``--array=1-10`` both work).
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence, TypeVar

from unisegcli.errors import UsageError

T = TypeVar("T")


def parse_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(I, N) from ``--shard I/N`` or the Slurm array variables; None when neither is set."""
    env = os.environ if environ is None else environ
    if spec:
        index_text, sep, count_text = spec.partition("/")
        try:
            index, count = int(index_text), int(count_text)
        except ValueError:
            index, count = 0, 0
        if not sep or count < 1 or not 1 <= index <= count:
            raise UsageError(
                f"--shard '{spec}' is not I/N with 1 <= I <= N; expected e.g. --shard 2/8 "
                "(shards are numbered from 1)."
            )
        return index, count
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            task = int(env["SLURM_ARRAY_TASK_ID"])
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        except ValueError as exc:
            raise UsageError(f"Slurm array variables are not integers ({exc}); pass --shard I/N.") from exc
        index = task - first + 1
        if count < 1 or not 1 <= index <= count:
            raise UsageError(
                f"Slurm array task {task} (min {first}, count {count}) is outside the array; "
                "expected a contiguous --array range, or pass --shard I/N."
            )
        return index, count
    return None


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The items of shard (I, N) of an already sorted sequence (all items when shard is None)."""
    if shard is None:
        return list(items)
    index, count = shard
    return [item for k, item in enumerate(items) if k % count == index - 1]
