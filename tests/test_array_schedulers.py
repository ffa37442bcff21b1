"""Job arrays of every scheduler as shard sources: the variables each one documents, their
precedence, and one-line usage errors for inconsistent sets (see unisegcli/io/sharding.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode, UsageError
from unisegcli.io.sharding import SCHEDULERS, parse_shard, select_shard

runner = CliRunner()

# (scheduler, environment of one task as the scheduler sets it, expected (I, N))
DOCUMENTED = [
    ("Slurm --array=0-9", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "9",
                           "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_STEP": "1"}, (1, 10)),
    ("Slurm --array=1-10", {"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "10",
                            "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_STEP": "1"}, (10, 10)),
    ("Slurm --array=1-7:2", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
                             "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_STEP": "2"}, (3, 4)),
    ("Slurm without MIN/MAX/STEP", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}, (3, 3)),
    ("Kubernetes completions=5", {"JOB_COMPLETION_INDEX": "2", "UNISEG_SHARD_COUNT": "5"}, (3, 5)),
    ("AWS Batch size 4", {"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}, (1, 4)),
    ("LSF [1-9:2]", {"LSB_JOBINDEX": "5", "LSB_JOBINDEX_END": "9", "LSB_JOBINDEX_STEP": "2"}, (3, 5)),
    ("LSF [1-4] without step", {"LSB_JOBINDEX": "4", "LSB_JOBINDEX_END": "4"}, (4, 4)),
    ("SGE -t 2-10:2", {"SGE_TASK_ID": "6", "SGE_TASK_FIRST": "2", "SGE_TASK_LAST": "10",
                       "SGE_TASK_STEPSIZE": "2"}, (3, 5)),
    ("SGE -t 1-9:3 (last not on the step)", {"SGE_TASK_ID": "7", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9",
                                             "SGE_TASK_STEPSIZE": "3"}, (3, 3)),
    ("PBS Pro -J 1-10", {"PBS_ARRAY_INDEX": "1", "UNISEG_SHARD_FIRST": "1", "UNISEG_SHARD_COUNT": "10"}, (1, 10)),
    ("Torque -t 0-1", {"PBS_ARRAYID": "1", "UNISEG_SHARD_FIRST": "0", "UNISEG_SHARD_COUNT": "2"}, (2, 2)),
    ("Slurm and Kubernetes agree", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0",
                                    "SLURM_ARRAY_TASK_COUNT": "3", "JOB_COMPLETION_INDEX": "1",
                                    "UNISEG_SHARD_COUNT": "3"}, (2, 3)),
]


@pytest.mark.parametrize("env, expected", [(e, x) for _, e, x in DOCUMENTED], ids=[n for n, _, _ in DOCUMENTED])
def test_each_scheduler_variables_give_the_shard(env: dict[str, str], expected: tuple[int, int]) -> None:
    assert parse_shard(None, env) == expected


@pytest.mark.parametrize("env", [
    {},
    {"LSB_JOBINDEX": "0"},  # LSF sets 0 for jobs that are not arrays
    {"SGE_TASK_ID": "undefined", "SGE_TASK_FIRST": "undefined", "SGE_TASK_LAST": "undefined",
     "SGE_TASK_STEPSIZE": "undefined"},  # Grid Engine outside arrays
    {"JOB_COMPLETION_INDEX": ""},
], ids=["nothing", "LSF outside an array", "SGE outside an array", "empty index"])
def test_outside_a_job_array_every_case_runs(env: dict[str, str]) -> None:
    assert parse_shard(None, env) is None


def _array_env(name: str, task: int, first: int, last: int, step: int) -> dict[str, str]:
    """The variables scheduler ``name`` sets for task ``task`` of the range first..last:step."""
    count = (last - first) // step + 1
    if name == "Slurm":
        return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first),
                "SLURM_ARRAY_TASK_MAX": str(first + (count - 1) * step), "SLURM_ARRAY_TASK_COUNT": str(count),
                "SLURM_ARRAY_TASK_STEP": str(step)}
    if name == "Kubernetes":
        return {"JOB_COMPLETION_INDEX": str(task), "UNISEG_SHARD_COUNT": str(count)}
    if name == "AWS Batch":
        return {"AWS_BATCH_JOB_ARRAY_INDEX": str(task), "AWS_BATCH_JOB_ARRAY_SIZE": str(count)}
    if name == "LSF":
        return {"LSB_JOBINDEX": str(task), "LSB_JOBINDEX_END": str(last), "LSB_JOBINDEX_STEP": str(step)}
    if name == "SGE":
        return {"SGE_TASK_ID": str(task), "SGE_TASK_FIRST": str(first), "SGE_TASK_LAST": str(last),
                "SGE_TASK_STEPSIZE": str(step)}
    index = "PBS_ARRAY_INDEX" if name == "PBS Pro" else "PBS_ARRAYID"
    return {index: str(task), "UNISEG_SHARD_FIRST": str(first), "UNISEG_SHARD_COUNT": str(count)}


# the ranges each scheduler can express (Kubernetes and AWS Batch: 0..N-1; LSF: from 1)
RANGES = {
    "Slurm": [(0, 6, 1), (3, 11, 4), (1, 1, 1)],
    "Kubernetes": [(0, 4, 1)],
    "AWS Batch": [(0, 2, 1)],
    "LSF": [(1, 5, 1), (1, 10, 3)],
    "SGE": [(1, 8, 1), (2, 10, 2), (1, 9, 3)],
    "PBS Pro": [(1, 6, 1)],
    "Torque": [(0, 3, 1)],
}


@pytest.mark.parametrize("name", [s.name for s in SCHEDULERS])
def test_the_tasks_of_every_array_cover_the_cohort_once(name: str) -> None:
    cases = [f"case{k:02d}" for k in range(17)]
    for first, last, step in RANGES[name]:
        shards = [parse_shard(None, _array_env(name, task, first, last, step))
                  for task in range(first, last + 1, step)]
        count = (last - first) // step + 1
        assert sorted(shards) == [(i, count) for i in range(1, count + 1)], (name, first, last, step)
        done = [c for shard in shards for c in select_shard(cases, shard)]
        assert sorted(done) == cases


# (what is wrong, environment, variables the one-line message must name)
INCONSISTENT = [
    ("non-integer index", {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, ["SLURM_ARRAY_TASK_ID"]),
    ("non-integer count", {"AWS_BATCH_JOB_ARRAY_INDEX": "1", "AWS_BATCH_JOB_ARRAY_SIZE": "many"},
     ["AWS_BATCH_JOB_ARRAY_SIZE"]),
    ("index past the count", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0",
                              "SLURM_ARRAY_TASK_COUNT": "3"}, ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"]),
    ("index below the first", {"SGE_TASK_ID": "1", "SGE_TASK_FIRST": "2", "SGE_TASK_LAST": "10",
                               "SGE_TASK_STEPSIZE": "2"}, ["SGE_TASK_ID", "SGE_TASK_FIRST"]),
    ("index off the step", {"SGE_TASK_ID": "5", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9",
                            "SGE_TASK_STEPSIZE": "3"}, ["SGE_TASK_ID", "SGE_TASK_STEPSIZE"]),
    ("a step of 0", {"LSB_JOBINDEX": "1", "LSB_JOBINDEX_END": "4", "LSB_JOBINDEX_STEP": "0"},
     ["LSB_JOBINDEX_STEP"]),
    ("a Slurm list --array=1,3,8", {"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1",
                                    "SLURM_ARRAY_TASK_MAX": "8", "SLURM_ARRAY_TASK_COUNT": "3",
                                    "SLURM_ARRAY_TASK_STEP": "1"}, ["SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT"]),
    ("LSF index past the end", {"LSB_JOBINDEX": "12", "LSB_JOBINDEX_END": "10"}, ["LSB_JOBINDEX", "LSB_JOBINDEX_END"]),
    ("AWS index past the size", {"AWS_BATCH_JOB_ARRAY_INDEX": "4", "AWS_BATCH_JOB_ARRAY_SIZE": "4"},
     ["AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"]),
    ("Kubernetes without a count", {"JOB_COMPLETION_INDEX": "0"}, ["JOB_COMPLETION_INDEX", "UNISEG_SHARD_COUNT"]),
    ("PBS Pro without a first index", {"PBS_ARRAY_INDEX": "3", "UNISEG_SHARD_COUNT": "3"},
     ["PBS_ARRAY_INDEX", "UNISEG_SHARD_FIRST"]),
    ("Torque index below the first", {"PBS_ARRAYID": "0", "UNISEG_SHARD_FIRST": "1", "UNISEG_SHARD_COUNT": "2"},
     ["PBS_ARRAYID", "UNISEG_SHARD_FIRST"]),
    ("count alone", {"UNISEG_SHARD_COUNT": "4"}, ["UNISEG_SHARD_COUNT", "JOB_COMPLETION_INDEX"]),
    ("count against the scheduler's", {"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "3",
                                       "UNISEG_SHARD_COUNT": "4"}, ["UNISEG_SHARD_COUNT", "AWS_BATCH_JOB_ARRAY_SIZE"]),
    ("two schedulers disagree", {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0",
                                 "SLURM_ARRAY_TASK_COUNT": "3", "AWS_BATCH_JOB_ARRAY_INDEX": "0",
                                 "AWS_BATCH_JOB_ARRAY_SIZE": "3"},
     ["SLURM_ARRAY_TASK_ID", "AWS_BATCH_JOB_ARRAY_INDEX", "Slurm", "AWS Batch"]),
]


@pytest.mark.parametrize("env, names", [(e, n) for _, e, n in INCONSISTENT], ids=[w for w, _, _ in INCONSISTENT])
def test_inconsistent_variables_are_a_one_line_usage_error(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(UsageError) as error:
        parse_shard(None, env)
    message = str(error.value)
    assert "\n" not in message and "--shard I/N" in message
    for name in names:
        assert name in message, (name, message)


@pytest.mark.parametrize("env", [e for _, e, _ in INCONSISTENT], ids=[w for w, _, _ in INCONSISTENT])
def test_an_explicit_shard_always_wins(env: dict[str, str]) -> None:
    assert parse_shard("2/5", env) == (2, 5)


def test_inconsistent_variables_exit_2_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """Through the CLI: exit code 2, one line naming the variables, no output folder content."""
    scan = save_nifti(tmp_path / "scan.nii.gz", np.zeros((8, 8, 4), np.float32), np.eye(4))
    for name in [v for s in SCHEDULERS for v in (s.index, s.first, s.count, s.last, s.step) if v]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.setenv("UNISEG_SHARD_COUNT", "3")
    monkeypatch.setenv("UNISEG_OFFLINE", "1")
    out = tmp_path / "out"
    result = runner.invoke(app, [str(scan), "-o", str(out), "--model", "uniseg-demo", "--tasks", "liver"])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "JOB_COMPLETION_INDEX=3" in result.output and "UNISEG_SHARD_COUNT=3" in result.output
    assert not out.exists() or not any(out.iterdir())
