"""How long `uniseg --help` takes, as a ratio to a bare `python -c pass` in the same run.

Goal: `uniseg --help` under 0.5 s (heavy imports such as torch and nibabel are lazy).
The commands are timed in rotating order (median of --repeat, after one warm-up run each).
Prints a small table and writes benchmarks/results/startup.json.

    .venv/bin/python benchmarks/startup.py [--repeat 7]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import common


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeat=7)
    args = parser.parse_args()
    machine = common.machine_record(common.setup(args))  # --device only goes into the record
    script = str(Path(sys.executable).with_name("uniseg"))
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "uniseg --help": [script, "--help"],
        "uniseg tasks": [script, "tasks"],
    }
    runs = {name: (lambda cmd=cmd: subprocess.run(cmd, capture_output=True, check=True))
            for name, cmd in commands.items()}
    for run in runs.values():
        run()  # warm-up: file cache, .pyc
    times = common.alternate(runs, args.repeat, log=False)
    seconds = {name: common.median(t) for name, t in times.items()}
    common.finish_record(machine)
    baseline = seconds["python -c pass"]
    print(common.machine_line(machine))
    common.print_table(["command", "median s", "ratio"],
                       [[name, s, s / baseline] for name, s in seconds.items()])
    met = seconds["uniseg --help"] < 0.5
    print(f"`uniseg --help` < 0.5 s: {common.verdict(met)}")
    common.write_result(common.result_name("startup", args), {
        "machine": machine,
        "seconds": seconds,
        "all_seconds": times,
        "ratio_help_to_python": seconds["uniseg --help"] / baseline,
        "targets": {"help_under_0.5s": {"value": seconds["uniseg --help"], "met": met}},
    })


if __name__ == "__main__":
    main()
