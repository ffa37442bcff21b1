"""Split the sorted case list between the tasks of a job array (``--shard I/N``, 1-based).

Case k of the sorted list (0-based) belongs to shard ``k mod N + 1``: deterministic,
disjoint, complete, and balanced to within one case.

Without ``--shard`` the job array's own variables decide. A task with index ``t`` in an array
of ``N`` tasks whose indices run ``first, first + step, ...`` takes shard
``I = (t - first) / step + 1`` of ``N``. Where each scheduler keeps these numbers, and the
documentation they come from:

    scheduler   task index                 first index           tasks N / last index       step
    Slurm       SLURM_ARRAY_TASK_ID        SLURM_ARRAY_TASK_MIN  SLURM_ARRAY_TASK_COUNT     SLURM_ARRAY_TASK_STEP
    Kubernetes  JOB_COMPLETION_INDEX       0                     UNISEG_SHARD_COUNT         1
    AWS Batch   AWS_BATCH_JOB_ARRAY_INDEX  0                     AWS_BATCH_JOB_ARRAY_SIZE   1
    LSF         LSB_JOBINDEX               1                     last: LSB_JOBINDEX_END     LSB_JOBINDEX_STEP
    SGE / UGE   SGE_TASK_ID                SGE_TASK_FIRST        last: SGE_TASK_LAST        SGE_TASK_STEPSIZE
    PBS Pro     PBS_ARRAY_INDEX            UNISEG_SHARD_FIRST    UNISEG_SHARD_COUNT         1
    Torque      PBS_ARRAYID                UNISEG_SHARD_FIRST    UNISEG_SHARD_COUNT         1

- Slurm, sbatch(1) "OUTPUT ENVIRONMENT VARIABLES" and https://slurm.schedmd.com/job_array.html
  (``SLURM_ARRAY_TASK_MAX``, when set, must be the last index of that range).
- Kubernetes Indexed Jobs, https://kubernetes.io/docs/tasks/job/indexed-parallel-processing-static/
  (the index is 0-based; Kubernetes has no variable for ``spec.completions``: set
  ``UNISEG_SHARD_COUNT`` to it in the pod template).
- AWS Batch, https://docs.aws.amazon.com/batch/latest/userguide/job_env_vars.html
  (set in child jobs of an array job only; the index is 0-based).
- IBM Spectrum LSF 10.1, Configuration Reference "Environment variables" (``LSB_JOBINDEX``,
  ``LSB_JOBINDEX_END``, ``LSB_JOBINDEX_STEP``) and "Passing arguments on the command line"
  (https://www.ibm.com/docs/en/SSWRJV_10.1.0/lsf_admin/job_array_cl_args.html): ``LSB_JOBINDEX``
  is 0 outside arrays. LSF has no variable for the first index, so the array must be one range
  starting at 1 (``-J "name[1-N]"`` or ``"name[1-N:step]"``).
- Sun/Univa/Altair Grid Engine, qsub(1) ``-t n[-m[:s]]`` (the ``SGE_TASK_*`` variables read
  ``undefined`` outside arrays).
- Altair PBS Professional, Reference Guide "PBS environment variables" (``PBS_ARRAY_INDEX``;
  ``qsub -J X-Y`` exports no range), and Torque, qsub(1) ``-t`` (``PBS_ARRAYID``): pass the
  range yourself, e.g. ``qsub -J 1-10 -v UNISEG_SHARD_FIRST=1,UNISEG_SHARD_COUNT=10``.

Precedence: ``--shard I/N`` always wins (the environment is then not read). Otherwise every
scheduler whose index variable is set must describe the same shard; anything inconsistent (a
missing or non-integer value, an index outside the range or off the step, a count that does not
match the last index, two schedulers that disagree) is a one-line UsageError naming the
variables, never a silent guess: a wrong shard would skip or repeat cases of the cohort.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

from unisegcli.errors import UsageError

T = TypeVar("T")

COUNT_VARIABLE = "UNISEG_SHARD_COUNT"  # the number of tasks, for schedulers that do not export it
FIRST_VARIABLE = "UNISEG_SHARD_FIRST"  # the first index, for schedulers that do not export it


@dataclass(frozen=True)
class ArrayScheduler:
    """Where one scheduler keeps a job array's numbers (names of environment variables)."""

    name: str
    index: str                       # this task's index
    first: str | None = None         # the first index (None: ``first_fixed``)
    first_fixed: int | None = None   # the first index when no variable holds it (None: UNISEG_SHARD_FIRST)
    count: str | None = None         # the number of tasks
    last: str | None = None          # the last index (N follows from first, last and step)
    step: str | None = None          # the step between indices (1 when None or unset)
    outside: tuple[str, ...] = ()    # index values the scheduler sets outside job arrays


SCHEDULERS: tuple[ArrayScheduler, ...] = (
    ArrayScheduler("Slurm", "SLURM_ARRAY_TASK_ID", first="SLURM_ARRAY_TASK_MIN", first_fixed=0,
                   count="SLURM_ARRAY_TASK_COUNT", last="SLURM_ARRAY_TASK_MAX", step="SLURM_ARRAY_TASK_STEP"),
    ArrayScheduler("Kubernetes", "JOB_COMPLETION_INDEX", first_fixed=0),
    ArrayScheduler("AWS Batch", "AWS_BATCH_JOB_ARRAY_INDEX", first_fixed=0, count="AWS_BATCH_JOB_ARRAY_SIZE"),
    ArrayScheduler("LSF", "LSB_JOBINDEX", first_fixed=1, last="LSB_JOBINDEX_END", step="LSB_JOBINDEX_STEP",
                   outside=("0",)),
    ArrayScheduler("SGE", "SGE_TASK_ID", first="SGE_TASK_FIRST", last="SGE_TASK_LAST", step="SGE_TASK_STEPSIZE",
                   outside=("undefined",)),
    ArrayScheduler("PBS Pro", "PBS_ARRAY_INDEX"),
    ArrayScheduler("Torque", "PBS_ARRAYID"),
)


def parse_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """(I, N), 1-based, from ``--shard I/N`` or else the job array's variables; None when neither."""
    if spec:
        return _parse_spec(spec)
    env = os.environ if environ is None else environ
    found = [(s, _shard_of(s, env)) for s in SCHEDULERS if _in_array(s, env)]
    if not found:
        if env.get(COUNT_VARIABLE, "").strip():
            raise UsageError(
                f"{COUNT_VARIABLE}={env[COUNT_VARIABLE]} is set but no job array index variable is "
                f"({', '.join(s.index for s in SCHEDULERS)}); expected both, or pass --shard I/N."
            )
        return None
    (first_scheduler, shard), *others = found
    for scheduler, other in others:
        if other != shard:
            raise UsageError(
                f"two job arrays disagree: {first_scheduler.name} says shard {shard[0]}/{shard[1]} "
                f"({_show(first_scheduler, env)}), {scheduler.name} says {other[0]}/{other[1]} "
                f"({_show(scheduler, env)}); expected one scheduler's variables. Unset the other's, "
                "or pass --shard I/N."
            )
    return shard


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """The items of shard (I, N) of an already sorted sequence (all items when shard is None)."""
    if shard is None:
        return list(items)
    index, count = shard
    return [item for k, item in enumerate(items) if k % count == index - 1]


def _parse_spec(spec: str) -> tuple[int, int]:
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


def _in_array(scheduler: ArrayScheduler, env: Mapping[str, str]) -> bool:
    value = env.get(scheduler.index)
    return value is not None and value.strip() != "" and value.strip() not in scheduler.outside


def _names(scheduler: ArrayScheduler) -> list[str]:
    """Every variable that can describe this scheduler's array, index first."""
    names = [scheduler.index, scheduler.first, scheduler.count, scheduler.last, scheduler.step]
    if scheduler.first is None and scheduler.first_fixed is None:
        names.append(FIRST_VARIABLE)
    if scheduler.count is None and scheduler.last is None:
        names.append(COUNT_VARIABLE)
    return [n for n in names if n is not None]


def _show(scheduler: ArrayScheduler, env: Mapping[str, str]) -> str:
    """``NAME=value`` for every variable of this scheduler that is set (or the index, unset)."""
    shown = [f"{n}={env[n]}" for n in _names(scheduler) if n in env]
    return ", ".join(shown) or f"{scheduler.index} unset"


def _shard_of(scheduler: ArrayScheduler, env: Mapping[str, str]) -> tuple[int, int]:
    """(I, N) for this task of ``scheduler``'s array, or a UsageError naming the variables."""

    def bad(problem: str, fix: str = "expected one evenly stepped range of task indices; "
                                      "fix the variables") -> UsageError:
        return UsageError(f"{scheduler.name} job array: {problem} ({_show(scheduler, env)}); {fix}, "
                          "or pass --shard I/N.")

    def number(name: str | None, default: int | None = None) -> int | None:
        text = env.get(name, "").strip() if name else ""
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise bad(f"{name}={text!r} is not an integer") from None

    task = number(scheduler.index)
    assert task is not None  # _in_array checked it is set
    first = number(scheduler.first, scheduler.first_fixed)
    if first is None:
        first = number(FIRST_VARIABLE)
        if first is None:
            raise bad(f"{scheduler.name} exports no array range",
                      f"set {FIRST_VARIABLE} to the first index and {COUNT_VARIABLE} to the number of tasks")
    step = number(scheduler.step, 1)
    assert step is not None
    if step < 1:
        raise bad(f"the step {step} is not positive")
    last = number(scheduler.last)
    own_count = number(scheduler.count)
    extra_count = number(COUNT_VARIABLE)
    if own_count is not None:
        count = own_count
        if last is not None and (last < first or (last - first) // step + 1 != count):
            raise bad(f"{count} tasks from {first} in steps of {step} do not end at {last}")
    elif last is not None:
        if last < first:
            raise bad(f"the last index {last} is below the first {first}")
        count = (last - first) // step + 1
    elif extra_count is not None:
        count = extra_count
    else:
        raise bad(f"{scheduler.name} exports no number of tasks",
                  f"set {COUNT_VARIABLE} to the number of tasks (a Kubernetes Job's spec.completions)")
    if extra_count is not None and extra_count != count:
        raise bad(f"{COUNT_VARIABLE}={extra_count} but the array has {count} tasks")
    if count < 1:
        raise bad(f"the array has {count} tasks")
    if task < first or (task - first) % step:
        raise bad(f"index {task} is not on the range from {first} in steps of {step}")
    index = (task - first) // step + 1
    if index > count:
        raise bad(f"index {task} is beyond the {count} tasks from {first} in steps of {step}")
    return index, count
