"""How long `uniseg --help` takes, as a ratio to a bare `python -c pass` in the same run.

Goal: `uniseg --help` under 0.5 s (heavy imports such as torch and nibabel are lazy).
The commands are timed in rotating order (median of --repeat, after one warm-up run each).
Prints a small table, writes benchmarks/results/startup.json and, last, the headline.

    .venv/bin/python benchmarks/startup.py [--repeat 7] [--small]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import common


def main() -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(repeat=7)
    common.add_small(parser, "3 timed runs per command instead of --repeat")
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
    times = common.alternate(runs, 3 if args.small else args.repeat, log=False)
    seconds = {name: common.median(t) for name, t in times.items()}
    common.finish_record(machine)
    baseline = seconds["python -c pass"]
    print(common.machine_line(machine))
    common.print_table(["command", "median s", "ratio"],
                       [[name, s, s / baseline] for name, s in seconds.items()])
    met = seconds["uniseg --help"] < 0.5
    print(f"`uniseg --help` < 0.5 s: {common.verdict(met)}")
    common.write_result(common.result_name("startup", args, "small" if args.small else None), {
        "machine": machine,
        "seconds": seconds,
        "all_seconds": times,
        "ratio_help_to_python": seconds["uniseg --help"] / baseline,
        "targets": {"help_under_0.5s": {"value": seconds["uniseg --help"], "met": met}},
    })
    common.headline("startup", f"uniseg --help {seconds['uniseg --help']:.3f} s = "
                    f"{seconds['uniseg --help'] / baseline:.1f}x python -c pass (target < 0.5 s: {common.verdict(met)})")


if __name__ == "__main__":
    main()
