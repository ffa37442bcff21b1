"""Container recipes: Containerfile, apptainer.def, scripts/install-in-image.sh, the README.

No container runtime can start on the project's machines, so the image is checked in two ways:

- fast tests read the recipe files: both Containerfile targets are the same recipe on different
  bases, every build command the README shows names a target, build argument and file that
  exist, and the shell scripts parse;
- the slow test (``make test-container``, run by CI) builds a Debian bookworm root file system
  with debootstrap (cached), runs scripts/install-in-image.sh in it with chroot exactly as the
  cpu target does, then runs uniseg there as the image's non-root user with no network and a
  64 MiB /dev/shm, and checks the demo's outputs here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTAINERFILE = ROOT / "Containerfile"
APPTAINER_DEF = ROOT / "apptainer.def"
INSTALL = ROOT / "scripts" / "install-in-image.sh"
ROOTFS_TEST = ROOT / "scripts" / "rootfs-test.sh"
SBATCH = ROOT / "examples" / "apptainer.sbatch"
EXAMPLE_CT = ROOT / "examples" / "example_ct.nii.gz"
DEMO_STRUCTURES = ("liver", "spleen", "kidney", "pancreas")


def stages(text: str) -> dict[str, list[str]]:
    """{stage name: its instructions (continuation lines joined)} of a Containerfile."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out: dict[str, list[str]] = {}
    current = None
    for line in lines:
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


def global_args(text: str) -> dict[str, str]:
    """ARG NAME=default lines before the first FROM."""
    head = text.split("\nFROM ", 1)[0]
    return dict(re.findall(r"^ARG\s+(\w+)=(\S*)", head, re.MULTILINE))


def stage_args(instructions: list[str]) -> dict[str, str]:
    return dict(m.groups() for i in instructions if (m := re.match(r"ARG\s+(\w+)=(.*)", i)))


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Run in a container\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## Run in a container' section"
    return m.group(1)


def commands(section: str, program: str, verb: str) -> list[str]:
    """Indented code lines of the section that run `program verb ...`, continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", section)
    return [ln.strip() for ln in joined.splitlines()
            if re.match(rf"\s{{4}}(sudo\s+)?{program}\s+{verb}\b", ln)]


# -- recipe files ----------------------------------------------------------------------------


def test_containerfile_has_a_cpu_and_a_cuda_target_with_one_recipe() -> None:
    text = CONTAINERFILE.read_text()
    found = stages(text)
    assert set(found) == {"cpu", "cuda"}
    assert found["cpu"][0].split()[1] == "${CPU_BASE}" and found["cuda"][0].split()[1] == "${CUDA_BASE}"
    assert set(global_args(text)) == {"CPU_BASE", "CUDA_BASE"}

    def normalised(name: str) -> list[str]:  # the stage with its variant name blanked out
        return [re.sub(rf"\b{name}\b", "VARIANT", i) for i in found[name][1:]]

    cpu, cuda = normalised("cpu"), normalised("cuda")
    differing = [(a, b) for a, b in zip(cpu, cuda) if a != b]
    # the only intended difference: where torch comes from (the PyTorch CPU index / PyPI)
    assert len(cpu) == len(cuda) and [a for a, _ in differing] == [
        "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/VARIANT"], differing
    for name in ("cpu", "cuda"):
        body = found[name]
        runs = [i for i in body if i.startswith("RUN ")]
        assert len(runs) == 1 and "scripts/install-in-image.sh" in runs[0], runs
        assert f"UNISEG_TORCH={name}" in runs[0]
        assert "USER 1000:1000" in body
        assert 'ENTRYPOINT ["uniseg"]' in body
        assert 'VOLUME ["/weights"]' in body
        assert any(i.startswith("ENV ") and "UNISEG_HOME=/weights" in i for i in body)
        label = " ".join(i for i in body if i.startswith("LABEL "))
        assert "org.opencontainers.image.licenses" in label and "model-licenses" in label
        assert "non-commercial" in label  # the model licenses differ from the code's: say so


def test_containerfile_version_label_is_the_package_version() -> None:
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    for name, body in stages(CONTAINERFILE.read_text()).items():
        assert stage_args(body)["UNISEG_VERSION"] == version, name
    assert f"UNISEG_VERSION={version}" in APPTAINER_DEF.read_text()


def test_cuda_target_is_marked_as_not_built_here() -> None:
    for path in (CONTAINERFILE, APPTAINER_DEF):
        prose = " ".join(re.sub(r"^#\s?", "", ln) for ln in path.read_text().splitlines())
        assert re.search(r"not (been )?built on the project's machines", prose, re.IGNORECASE), path
    assert "not built here" in readme_section()


def test_build_context_keeps_what_the_install_script_needs() -> None:
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for needed in ("pyproject.toml", "README.md", "constraints.txt", "unisegcli", "scripts"):
        assert needed not in ignored
    assert ".venv" in ignored and ".git" in ignored


def test_apptainer_def_builds_the_same_way() -> None:
    text = APPTAINER_DEF.read_text()
    assert re.search(r"^Bootstrap:\s*docker$", text, re.MULTILINE)
    sections = dict(re.findall(r"^%(\w+)\n(.*?)(?=^%|\Z)", text, re.MULTILINE | re.DOTALL))
    assert "exec uniseg \"$@\"" in sections["runscript"]
    assert "scripts/install-in-image.sh" in sections["post"]
    assert "UNISEG_HOME=/weights" in sections["environment"]
    for line in sections["files"].strip().splitlines():
        source = line.split()[0]
        assert (ROOT / source).exists(), f"%files copies {source}, which the repository lacks"


def test_sbatch_runs_the_image_with_the_gpu_and_read_only_weights() -> None:
    text = SBATCH.read_text()
    assert "apptainer exec --nv" in text
    assert re.search(r'--bind "\$WEIGHTS:/weights:ro"', text)
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


@pytest.mark.parametrize("script", [INSTALL, ROOTFS_TEST])
def test_shell_scripts_parse(script: Path) -> None:
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_readme_build_commands_match_the_recipes() -> None:
    section = readme_section()
    text = CONTAINERFILE.read_text()
    found = stages(text)
    known_args = set(global_args(text)) | {a for body in found.values() for a in stage_args(body)}
    builds = commands(section, "(docker|podman)", "build")
    assert builds, "no docker/podman build command in the README section"
    for cmd in builds:
        assert "-f Containerfile" in cmd, cmd
        target = re.search(r"--target\s+(\S+)", cmd)
        assert target and target.group(1) in found, cmd
        for arg in re.findall(r"--build-arg\s+(\w+)=", cmd):
            assert arg in known_args, f"{cmd}: no ARG {arg} in Containerfile"
    def_args = set(re.findall(r"^\s+(\w+)=", text_of_section(APPTAINER_DEF.read_text(), "arguments"),
                              re.MULTILINE))
    apptainer = commands(section, "apptainer", "build")
    assert any("apptainer.def" in c for c in apptainer), apptainer
    for cmd in apptainer:
        for arg in re.findall(r"--build-arg\s+(\w+)=", cmd):
            assert arg in def_args, f"{cmd}: no {arg} in apptainer.def %arguments"
    runs = commands(section, "(docker|podman)", "run")
    assert any("--gpus all" in c for c in runs) and any("/weights" in c for c in runs)


def text_of_section(text: str, name: str) -> str:
    m = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", text, re.MULTILINE | re.DOTALL)
    return m.group(1) if m else ""


# -- the image, built in a Debian chroot --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0,
                    reason="needs Linux and root (debootstrap, chroot, mount namespaces)")
def test_image_recipe_in_a_debian_chroot(tmp_path: Path) -> None:
    import nibabel as nib

    results = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable)
    # Progress and timings go to stderr: live with `pytest -s` (make test-container), else
    # captured by pytest and shown when the test fails.
    proc = subprocess.run(["bash", str(ROOTFS_TEST), str(results)], env=env, timeout=2400)
    assert proc.returncode == 0, f"scripts/rootfs-test.sh failed (exit {proc.returncode}); see stderr"

    # the runtime contract: non-root, no network, Docker's default 64 MiB /dev/shm
    assert (results / "uid.txt").read_text().strip() == "1000"
    assert int((results / "shm.txt").read_text().split()[-1]) == 64 * 1024 * 1024
    interfaces = [ln.split(":")[0].strip() for ln in (results / "net.txt").read_text().splitlines()[2:]]
    assert interfaces == ["lo"]
    # CLI and packaging: the CPU build of torch, the demo model inside the wheel
    help_text = (results / "help.txt").read_text()
    assert all(c in help_text for c in ("segment", "models", "tasks", "weights"))
    assert "uniseg-demo" in (results / "models.txt").read_text()
    assert re.search(r"torch \S+\+cpu \(cuda: none", (results / "version.txt").read_text())

    events = [json.loads(ln) for ln in (results / "demo-events.jsonl").read_text().splitlines()]
    finished = events[-1]
    assert finished["event"] == "run_finished" and finished["done"] == 1 and finished["failed"] == 0
    scan = nib.load(EXAMPLE_CT)
    out = results / "out"
    owners = {ln.split()[0] for ln in (results / "owners.txt").read_text().splitlines()}
    assert owners == {"1000"}
    for name in DEMO_STRUCTURES:
        mask = nib.load(out / f"{name}.nii.gz")
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
        data = np.asarray(mask.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1} and data.any(), name
    stats = json.loads((out / "statistics.json").read_text())
    assert set(stats["structures"]) == set(DEMO_STRUCTURES)
    assert all(s["volume_ml"] > 0 for s in stats["structures"].values())
    assert stats["file_shape_ijk"] == list(scan.shape)
