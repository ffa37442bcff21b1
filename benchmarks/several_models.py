"""Seconds for a cohort segmented by two models: one `uniseg --model a,b` command against one
command per model (what users ran before, then merged by hand).

Both sides are real subprocesses over the same cohort of example-CT crops, alternately,
--repeat times each, into fresh output folders:

    baseline:     uniseg COHORT -o A --model uniseg-demo --tasks liver,spleen
                  uniseg COHORT -o B --model nnunet:<tiny fixture> --tasks kidney
    combination:  uniseg COHORT -o C --model uniseg-demo,nnunet:<tiny fixture>
                         --tasks liver,spleen,nnunet:<tiny fixture>:kidney

The combination starts one interpreter, reads each scan once and writes one set of files per
case; the networks run the same windows on both sides. Both networks are tiny (the demo model
and the nnU-Net test fixture), so start-up and reading weigh more than they would with full
models: the ratio is an upper bound of the saving.

    .venv/bin/python benchmarks/several_models.py [--cases 8] [--small] [--repeat 3]

Prints a table and, last, the headline; writes benchmarks/results/several_models.json.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from workers import make_cohort

NNUNET = "nnunet:" + str(common.NNUNET_FIXTURE / "Dataset999_Tiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres")


def uniseg(cohort: Path, out: Path, *args: str) -> None:
    """One command over the cohort, into a fresh output folder."""
    shutil.rmtree(out, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("uniseg")), str(cohort), "-o", str(out), "--offline", "-q", *args]
    subprocess.run(command, check=True)


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8, help="cases in the cohort (default 8)")
    parser.add_argument("--small", action="store_true", help="4 small cases, one run each (about a minute)")
    args = parser.parse_args()
    machine = common.machine_record(common.setup(args))
    count, size, repeat = (4, 48, 1) if args.small else (args.cases, 96, args.repeat)
    with tempfile.TemporaryDirectory(prefix="uniseg-bench-models-") as tmp:
        cohort, root = Path(tmp) / "cohort", Path(tmp)
        make_cohort(cohort, count, size)

        def baseline() -> None:
            uniseg(cohort, root / "a", "--model", "uniseg-demo", "--tasks", "liver,spleen")
            uniseg(cohort, root / "b", "--model", NNUNET, "--tasks", "kidney")

        def combination() -> None:
            uniseg(cohort, root / "c", "--model", f"uniseg-demo,{NNUNET}", "--tasks", f"liver,spleen,{NNUNET}:kidney")

        times = common.alternate({"one command per model": baseline, "--model a,b": combination}, repeat)
    common.finish_record(machine)
    seconds = {name: common.median(t) for name, t in times.items()}
    ratio = seconds["one command per model"] / seconds["--model a,b"]
    print(common.machine_line(machine))
    common.print_table(["commands", "median s", "speed-up"],
                       [[name, s, seconds["one command per model"] / s] for name, s in seconds.items()])
    common.write_result(common.result_name("several_models", args, "small" if args.small else None), {
        "machine": machine, "cases": count, "crop_voxels": [size, size, 16], "repeat": repeat,
        "seconds": times, "ratio": ratio})
    print(f"several models: one --model a,b command {seconds['--model a,b']:.1f} s vs one command per model "
          f"{seconds['one command per model']:.1f} s = {ratio:.2f}x ({count} cases)")


if __name__ == "__main__":
    main()
