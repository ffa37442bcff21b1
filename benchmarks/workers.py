"""Cases per hour of one `uniseg` command with worker processes, against one process.

Runs the embedded demo model (offline) over a cohort of crops of the example CT, as real
subprocesses: `uniseg COHORT -o OUT` (one process) and `uniseg COHORT -o OUT --workers 2`
(two CPU workers, the cores split between them), alternately, --repeat times each, into fresh
output folders. On a 2-core machine expect about 1x: the point is the mechanism (one model
load per worker, cases to whichever worker is free), not more cores. On a GPU node the same
comparison with `--devices cuda:0,cuda:1` needs two GPUs.

    .venv/bin/python benchmarks/workers.py [--cases 12] [--small] [--repeat 3]

Prints a table and, last, the headline; writes benchmarks/results/workers.json.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import common


def make_cohort(folder: Path, count: int, size: int) -> list[Path]:
    """``count`` crops of the example CT (size x size x 16 voxels, shifted so no two are equal)."""
    import nibabel as nib

    image = nib.load(str(common.EXAMPLE_CT))
    data = np.asarray(image.dataobj)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(count):
        x0, y0 = 8 + (k * 5) % 40, 8 + (k * 3) % 40
        crop = data[x0:x0 + size, y0:y0 + size, 2:18]
        path = folder / f"case{k:03d}.nii.gz"
        nib.save(nib.Nifti1Image(crop, image.affine, image.header), str(path))
        paths.append(path)
    return paths


def run(cohort: Path, out: Path, workers: int | None) -> None:
    """One command over the cohort, into a fresh output folder."""
    shutil.rmtree(out, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("uniseg")), str(cohort), "-o", str(out), "--model", "uniseg-demo",
               "--tasks", "liver,spleen", "--offline", "-q"]
    if workers:
        command += ["--workers", str(workers)]
    subprocess.run(command, check=True)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12, help="cases in the cohort (default 12)")
    common.add_small(parser, "6 cases of 48x48x16 voxels, one run each")
    args = parser.parse_args()
    machine = common.machine_record(common.setup(args))
    count, size, repeat = (6, 48, 1) if args.small else (args.cases, 96, args.repeat)
    with tempfile.TemporaryDirectory(prefix="uniseg-bench-workers-") as tmp:
        cohort = Path(tmp) / "cohort"
        make_cohort(cohort, count, size)
        contestants = {"1 process": lambda: run(cohort, Path(tmp) / "one", None),
                       "--workers 2": lambda: run(cohort, Path(tmp) / "two", 2)}
        times = common.alternate(contestants, repeat)
    common.finish_record(machine)
    seconds = {name: common.median(t) for name, t in times.items()}
    per_hour = {name: count * 3600.0 / s for name, s in seconds.items()}
    ratio = per_hour["--workers 2"] / per_hour["1 process"]
    print(common.machine_line(machine))
    common.print_table(["command", "median s", "cases/hour", "ratio"],
                       [[name, seconds[name], per_hour[name], per_hour[name] / per_hour["1 process"]]
                        for name in seconds])
    common.write_result(common.result_name("workers", args, "small" if args.small else None), {
        "machine": machine, "cases": count, "crop_voxels": [size, size, 16], "repeat": repeat,
        "seconds": times, "cases_per_hour": per_hour, "ratio": ratio})
    common.headline("workers", f"--workers 2 {per_hour['--workers 2']:.0f} vs 1 process {per_hour['1 process']:.0f} "
                    f"cases/hour = {ratio:.2f}x ({count} cases, {machine.get('cpus', '?')} cores)")


if __name__ == "__main__":
    main()
