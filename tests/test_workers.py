"""Worker processes (``--workers``, ``--devices``): same files as one process, a killed worker
is survived, bad settings are one-line errors. Workers are real spawned processes; their
network is the stand-in ThresholdNet, installed by a sitecustomize hook (PYTHONPATH)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import phantom_ct, save_nifti
from unisegcli.cli.app import app
from unisegcli.errors import ExitCode, UsageError
from unisegcli.workers import worker_specs

runner = CliRunner()
TESTS = Path(__file__).parent
HOOK = (
    "import os, signal, sys\n"
    f"sys.path.insert(0, {str(TESTS)!r})\n"
    "import unisegcli.session, unisegcli.casework, conftest\n"
    "unisegcli.session.load_network = lambda segmenter: conftest.ThresholdNet()\n"
    "flag = os.environ.get('UNISEG_TEST_KILL_FLAG')  # a file path, or 'always'\n"
    "real = unisegcli.casework.one_case\n"
    "def one_case(segmenter, loaded, planned, cohort):\n"
    "    if flag and loaded.case.case_id == os.environ['UNISEG_TEST_KILL_CASE'] and not os.path.exists(flag):\n"
    "        if flag != 'always':\n"
    "            open(flag, 'w').close()\n"
    "        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-case\n"
    "    return real(segmenter, loaded, planned, cohort)\n"
    "unisegcli.casework.one_case = one_case\n"
)


@pytest.fixture
def worker_hook(tmp_path: Path, monkeypatch) -> Path:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return hook


def cohort(folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for k in range(count):
        box = (slice(4 + k % 5, 14 + k % 5), slice(6, 16), slice(2, 6))
        save_nifti(folder / f"case{k:02d}.nii.gz", phantom_ct(shape=(24, 22, 8), box=box), np.diag([-1.5, -1.5, 3, 1]))
    return folder


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def outputs_of(out: Path) -> dict[str, object]:
    """Every file below ``out`` (markers aside): masks as arrays, text files as text."""
    found: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        key = str(path.relative_to(out))
        found[key] = np.asarray(nib.load(str(path)).dataobj) if path.name.endswith(".nii.gz") else path.read_text()
    return found


def test_two_workers_write_the_same_files_as_one_process(tmp_path: Path, threshold_net, worker_hook) -> None:
    inputs = cohort(tmp_path / "in")
    serial = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "serial"), "--tasks", "liver", "-q"])
    assert serial.exit_code == 0, serial.output
    parallel = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "par"), "--tasks", "liver", "--workers", "2",
                                   "--json"])
    assert parallel.exit_code == 0, parallel.output
    events = events_of(parallel.stdout)
    done = [e for e in events if e["event"] == "case_done"]
    assert sorted(e["case_id"] for e in done) == [f"case{k:02d}" for k in range(6)]
    assert {e["worker"] for e in done} <= {"w0", "w1"} and all(e["device"] == "cpu" for e in done)
    assert events[0]["event"] == "run_started" and events[-1]["event"] == "run_finished"
    a, b = outputs_of(tmp_path / "serial"), outputs_of(tmp_path / "par")
    assert a.keys() == b.keys() and len(a) == 6 * 4 + 2  # 2 masks + 2 statistics files per case, cohort tables
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key
    # the markers of the parallel run are valid for a serial resume
    again = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "par"), "--tasks", "liver", "--json"])
    assert [e["event"] for e in events_of(again.stdout)].count("case_skipped") == 6


def test_a_killed_worker_loses_only_its_case_and_the_case_is_retried(tmp_path: Path, worker_hook,
                                                                    monkeypatch) -> None:
    inputs = cohort(tmp_path / "in")
    monkeypatch.setenv("UNISEG_TEST_KILL_FLAG", str(tmp_path / "killed-once"))
    monkeypatch.setenv("UNISEG_TEST_KILL_CASE", "case03")
    out = tmp_path / "out"
    result = runner.invoke(app, [str(inputs), "-o", str(out), "--tasks", "liver", "--workers", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "killed-once").exists()  # the worker really died once
    events = events_of(result.stdout)
    retries = [e for e in events if e["event"] == "case_retry"]
    assert [(e["case_id"], e["reason"]) for e in retries] == [("case03", "worker_died")]
    assert sorted(e["case_id"] for e in events if e["event"] == "case_done") == [f"case{k:02d}" for k in range(6)]
    for k in range(6):
        folder = out / f"case{k:02d}"
        assert (folder / ".uniseg-done.json").exists() and (folder / "liver.nii.gz").exists()
    assert not [p for p in out.rglob(".*tmp*")]


def test_a_case_that_kills_its_worker_twice_fails_alone(tmp_path: Path, worker_hook, monkeypatch) -> None:
    inputs = cohort(tmp_path / "in", count=3)
    monkeypatch.setenv("UNISEG_TEST_KILL_FLAG", "always")
    monkeypatch.setenv("UNISEG_TEST_KILL_CASE", "case01")
    result = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "out"), "--tasks", "liver", "--workers", "2",
                                 "--json"])
    assert result.exit_code == ExitCode.PARTIAL, result.output
    failed = [e for e in events_of(result.stdout) if e["event"] == "case_failed"]
    assert [e["case_id"] for e in failed] == ["case01"] and failed[0]["exit_code"] == ExitCode.RUNTIME
    assert "for the second time" in failed[0]["message"]
    assert (tmp_path / "out" / "case00" / "liver.nii.gz").exists()


def test_worker_settings_are_checked() -> None:
    assert [(s.name, s.device) for s in worker_specs(None, 2)] == [("w0", "cpu"), ("w1", "cpu")]
    assert all(s.threads >= 1 for s in worker_specs(None, 2))
    assert [s.threads for s in worker_specs(None, 3, threads=2)] == [2, 2, 2]
    assert worker_specs(None, None) == []
    with pytest.raises(UsageError, match="both given"):
        worker_specs("cpu", 2)
    with pytest.raises(UsageError, match="twice"):
        worker_specs("cpu,cpu", None)
    import torch

    if not torch.cuda.is_available():
        from unisegcli.errors import DeviceError

        with pytest.raises(DeviceError, match="--devices all found no CUDA device"):
            worker_specs("all", None)
        with pytest.raises(DeviceError):
            worker_specs("cuda:0,cuda:1", None)


def test_sigterm_stops_every_worker_cleanly(tmp_path: Path, worker_hook) -> None:
    """SIGTERM to the command while a worker is inside a case: exit 130, the finished cases keep
    their files, no worker process is left, nothing partial is written."""
    import os
    import signal
    import subprocess
    import sys

    inputs = cohort(tmp_path / "in", count=4)
    (worker_hook / "sitecustomize.py").write_text(HOOK + (
        "import time\n"
        "inner = unisegcli.casework.one_case\n"
        "def blocking(segmenter, loaded, planned, cohort):\n"
        "    if loaded.case.case_id == 'case02':\n"
        "        while True:  # until the worker is told to stop\n"
        "            time.sleep(0.05)\n"
        "    return inner(segmenter, loaded, planned, cohort)\n"
        "unisegcli.casework.one_case = blocking\n"))
    out = tmp_path / "out"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("uniseg")), str(inputs), "-o", str(out), "--tasks",
                             "liver", "--workers", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for the blocking case to be inside a worker
        event = json.loads(line)
        if event["event"] == "case_started" and event["case_id"] == "case02":
            break
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                for pid in children if Path(f"/proc/{pid}/cmdline").exists()}
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, stderr
    assert json.loads(rest.splitlines()[-1])["interrupted"] is True
    assert not (out / "case02").exists() or sorted(p.name for p in (out / "case02").iterdir()) == []
    assert not [p for p in out.rglob(".*tmp*")]
    workers = [pid for pid, command in commands.items() if "spawn_main" in command]
    assert len(workers) == 2, commands
    for pid in workers:  # both workers exited before the command did (a zombie counts as exited)
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            state = next((ln for ln in status.read_text().splitlines() if ln.startswith("State:")), "")
            assert "Z" in state, (pid, state, commands[pid])


def test_workers_that_cannot_load_the_model_fail_the_run_with_its_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UNISEG_HOME", str(tmp_path / "empty-cache"))
    inputs = cohort(tmp_path / "in", count=2)
    result = runner.invoke(app, [str(inputs), "-o", str(tmp_path / "out"), "--tasks", "liver", "--workers", "2",
                                 "--offline"])
    assert result.exit_code == ExitCode.WEIGHTS, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "uniseg weights import uniseg" in lines[0]
