"""examples/slurm_array.sbatch, unchanged, under a real one-node Slurm (scripts/slurm-local.sh).

A session fixture starts munged, slurmctld and slurmd in a temporary folder and stops them at
the end; where Slurm cannot be set up (not root, no apt-get) the tests skip with the reason.
The jobs run this checkout's uniseg (PYTHONPATH) from this interpreter's folder (PATH) on
small crops of examples/example_ct.nii.gz with the packaged demo model, offline.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from unisegcli.io.sharding import select_shard

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
SBATCH = ROOT / "examples" / "slurm_array.sbatch"
TASKS = 3                 # array tasks
CASES = 7                 # cases of the cohort
CORRUPT = "case04"        # garbage bytes instead of a NIfTI


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy (bounded; no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    """Clients of the one-node cluster (SLURM_CONF points at its config)."""

    env: dict[str, str]

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def tasks(self, job_id: str) -> dict[str, tuple[str, int]]:
        """Finished array task id -> (state, exit code), from the cluster's job completion log."""
        log = Path(self.env["UNISEG_SLURM_DIR"]) / "log" / "jobcomp.log"
        tasks = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("ArrayJobId") == job_id:
                tasks[fields["ArrayTaskId"]] = (fields["JobState"], int(fields["ExitCode"].split(":")[0]))
        return tasks

    def wait_finished(self, job_id: str, timeout_s: float = 180) -> dict[str, tuple[str, int]]:
        return wait_for(lambda: len(t := self.tasks(job_id)) == TASKS and t, timeout_s, f"job {job_id} to finish")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the local Slurm cluster needs Linux")
    folder = tmp_path_factory.mktemp("slurm")
    if len(str(folder / "munge.socket")) > 100:  # a Unix socket path holds at most 107 bytes
        folder = Path(tempfile.mkdtemp(prefix="uniseg-slurm-", dir="/tmp"))
    env = {**os.environ, "UNISEG_SLURM_DIR": str(folder), "SLURM_CONF": str(folder / "slurm.conf"),
           "UNISEG_SLURMCTLD_PORT": str(free_port()), "UNISEG_SLURMD_PORT": str(free_port())}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    reason = (started.stderr.strip().splitlines() or ["(no output)"])[-1]
    if started.returncode == 77:
        pytest.skip(reason)
    try:
        if started.returncode != 0:
            pytest.fail(f"scripts/slurm-local.sh start failed (exit {started.returncode}):\n{started.stderr}")
        yield Cluster(env)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=180)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 small CT crops (48 x 48 x 12 voxels), one corrupt, and the input list naming them."""
    import nibabel as nib
    import numpy as np

    folder = tmp_path_factory.mktemp("cohort")
    image = nib.load(str(ROOT / "examples" / "example_ct.nii.gz"))
    volume = np.asanyarray(image.dataobj)
    paths = []
    for k in range(CASES):
        path = folder / "in" / f"case{k:02d}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        if path.stem.startswith(CORRUPT):
            path.write_bytes(np.random.default_rng(k).bytes(3000))
        else:
            nib.save(nib.Nifti1Image(volume[10 + 4 * k:58 + 4 * k, 20:68, 9:21], image.affine), str(path))
        paths.append(path)
    (folder / "cases.txt").write_text("".join(f"{p}\n" for p in paths))
    return folder


GOOD = [f"case{k:02d}" for k in range(CASES) if f"case{k:02d}" != CORRUPT]


def submit(cluster: Cluster, cohort: Path, out: Path, *options: str) -> tuple[str, int]:
    """sbatch the example unchanged; settings by environment, resources on the command line."""
    job_env = {
        "INPUT_LIST": str(cohort / "cases.txt"), "OUT": str(out), "MODEL": "uniseg-demo", "TASKS": "liver",
        "UNISEG_HOME": str(cohort / "uniseg-home"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),
    }
    submitted = cluster.run(
        "sbatch", "--parsable", f"--array=0-{TASKS - 1}", "--export=ALL," + ",".join(f"{k}={v}" for k, v in job_env.items()),
        f"--output={cohort}/slurm_%A_%a.log", "--cpus-per-task=1", "--mem=500M", "--time=10", f"--chdir={cohort}",
        *options, str(SBATCH), timeout=240)
    assert submitted.stdout.strip(), submitted.stderr
    return submitted.stdout.strip().split(";")[0], submitted.returncode


def events(out: Path, job_id: str) -> dict[str, list[dict[str, Any]]]:
    """Array task id -> its JSON events ($OUT/logs/uniseg_<job>_<task>.jsonl)."""
    logs = sorted((out / "logs").glob(f"uniseg_{job_id}_*.jsonl"))
    return {p.stem.rsplit("_", 1)[1]: [json.loads(line) for line in p.read_text().splitlines()] for p in logs}


def case_ids(task_events: dict[str, list[dict[str, Any]]], kind: str) -> Counter[str]:
    return Counter(e["case_id"] for es in task_events.values() for e in es if e["event"] == kind)


def expected_exit_codes() -> dict[str, int]:
    """Documented exit codes: 6 for the task whose shard holds the corrupt case, else 0."""
    cases = [f"case{k:02d}" for k in range(CASES)]
    return {str(t): 6 if CORRUPT in select_shard(cases, (t + 1, TASKS)) else 0 for t in range(TASKS)}


def assert_no_partial_files(out: Path) -> None:
    hidden = [p for p in out.rglob(".*") if ".tmp" in p.name or p.name.startswith(".uniseg-write-test")]
    assert not hidden, hidden
    for folder in (p for p in out.iterdir() if p.is_dir() and p.name != "logs"):
        if any(folder.glob("*.nii.gz")):
            assert (folder / ".uniseg-done.json").is_file(), f"{folder.name} has masks but no done marker"


@pytest.fixture(scope="module")
def array_run(slurm: Cluster, cohort: Path) -> tuple[str, int, Path]:
    out = cohort / "out"
    job_id, code = submit(slurm, cohort, out, "--wait")
    return job_id, code, out


def test_array_job_segments_each_good_case_exactly_once(slurm: Cluster, array_run) -> None:
    job_id, code, out = array_run
    # sbatch --wait exits with the highest exit code of the array's tasks
    assert code == 6
    tasks = slurm.wait_finished(job_id, 30)
    assert {t: c for t, (_, c) in tasks.items()} == expected_exit_codes(), tasks
    task_events = events(out, job_id)
    assert sorted(task_events) == [str(t) for t in range(TASKS)]
    assert case_ids(task_events, "case_done") == Counter(GOOD)
    assert case_ids(task_events, "case_failed") == Counter([CORRUPT])
    for case in GOOD:
        assert (out / case / ".uniseg-done.json").is_file() and (out / case / "liver.nii.gz").is_file(), case
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["case_id"] for f in failures] == [CORRUPT]
    assert_no_partial_files(out)


def test_resubmitting_skips_every_done_case(slurm: Cluster, cohort: Path, array_run) -> None:
    first_job, _, out = array_run
    job_id, code = submit(slurm, cohort, out, "--wait")
    assert job_id != first_job and code == 6
    task_events = events(out, job_id)
    assert case_ids(task_events, "case_skipped") == Counter(GOOD)
    assert not case_ids(task_events, "case_done")
    assert case_ids(task_events, "case_failed") == Counter([CORRUPT])  # a failed case is tried again


def test_scancel_leaves_no_partial_files_and_a_resubmission_completes(slurm: Cluster, cohort: Path) -> None:
    out = cohort / "out-cancelled"
    job_id, code = submit(slurm, cohort, out)
    assert code == 0

    def a_started_case() -> tuple[str, str] | None:
        for task, es in events(out, job_id).items():
            started = [e["case_id"] for e in es if e["event"] == "case_started"]
            if started:
                return task, started[0]
        return None

    task, case = wait_for(a_started_case, 120, "a case_started event")
    cancelled = slurm.run("scancel", f"{job_id}_{task}")  # SIGTERM, then SIGKILL after KillWait
    assert cancelled.returncode == 0, cancelled.stderr
    tasks = slurm.wait_finished(job_id)
    assert tasks[task][0] == "CANCELLED", tasks
    # Slurm logs the task as cancelled at once; uniseg then stops the case it was in and
    # reports last (the exit code Slurm logged is from before that, so read uniseg's own)
    finished = wait_for(lambda: [e for e in events(out, job_id)[task] if e["event"] == "run_finished"], 60,
                        "the cancelled task's run_finished event")
    assert finished[0]["interrupted"] and finished[0]["exit_code"] == 130, finished
    task_events = {task: events(out, job_id)[task]}
    # the case in flight (normally `case`; none if SIGTERM fell between two cases) left nothing
    in_flight = case_ids(task_events, "case_started") - case_ids(task_events, "case_done")
    assert len(in_flight) <= 1, in_flight
    for stopped in in_flight:
        assert not (out / stopped / ".uniseg-done.json").exists()
        assert not list((out / stopped).glob("*.nii.gz")), stopped
    assert_no_partial_files(out)

    again, code = submit(slurm, cohort, out, "--wait")
    assert code == 6
    first, second = events(out, job_id), events(out, again)
    assert set(in_flight) <= set(case_ids(second, "case_done"))
    # across both submissions every good case was done exactly once, and is done now
    assert case_ids(first, "case_done") + case_ids(second, "case_done") == Counter(GOOD)
    assert sorted(case_ids(second, "case_skipped") + case_ids(second, "case_done")) == GOOD
    for good in GOOD:
        assert (out / good / ".uniseg-done.json").is_file(), good
    assert_no_partial_files(out)
