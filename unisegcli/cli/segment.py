"""`uniseg segment` (the default command): parse options into typed option objects, build one
``Segmenter`` (a ``Combination`` for several models) and run it over the inputs."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from unisegcli.cli import console
from unisegcli.errors import UsageError

DEVICE_HELP = "Where to run: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
INPUT = "Main"
ENGINE = "Engine"
OUTPUT = "Outputs"
BATCH = "Batch and HPC"
REPORT = "Reporting"


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def segment_command(
    inputs: Annotated[
        Optional[list[Path]],
        typer.Argument(
            help="Scans: .nii/.nii.gz files, folders of them (recursive), DICOM folders (one case per study) "
                 "or .zip, globs.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the results (created if missing).", show_default=False,
                     rich_help_panel=INPUT),
    ] = ...,  # type: ignore[assignment]
    tasks: Annotated[
        str,
        typer.Option("--tasks", "-t", help="Comma-separated task names, e.g. liver,kidney (see `uniseg tasks`).",
                     show_default=False, rich_help_panel=INPUT),
    ] = ...,  # type: ignore[assignment]
    model: Annotated[str, typer.Option("--model", "-m", help="Model from the registry (see `uniseg models`); "
                                       "several, e.g. uniseg,totalsegmentator: each task from the first that has "
                                       "it, or MODEL:TASK in --tasks.", rich_help_panel=INPUT)] = "uniseg",
    compare: Annotated[Optional[str], typer.Option(
        "--compare", help="Structures to run on every model of --model that has them, e.g. liver: writes "
        "compare.json/.csv (Dice, volume difference) per case and OUT/compare.csv.", rich_help_panel=INPUT,
        show_default=False)] = None,
    input_list: Annotated[Optional[str], typer.Option(
        "--input-list", help="File listing inputs: one path per line, or CSV with case_id,path (or one column "
        "per channel); '-' reads stdin.", rich_help_panel=INPUT)] = None,
    channel: Annotated[Optional[list[str]], typer.Option(
        "--channel", help="A channel file of a multi-channel case, as NAME=PATH (repeat: --channel t1=a.nii.gz "
        "--channel t2=b.nii.gz ...); names as in `uniseg tasks`.", rich_help_panel=INPUT)] = None,
    series: Annotated[Optional[str], typer.Option(
        "--series", help="SeriesInstanceUID to take from a DICOM study (default: chosen by rules, see README).",
        rich_help_panel=INPUT)] = None,
    device: Annotated[str, typer.Option("--device", "-d", help=DEVICE_HELP, rich_help_panel=ENGINE)] = "auto",
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", min=1, help="Windows per forward pass (default: 1 on CPU, from free memory on GPU).",
        rich_help_panel=ENGINE)] = None,
    step: Annotated[Optional[float], typer.Option(
        "--step", min=0.1, max=1.0, help="Sliding-window step as a fraction of the patch (smaller: more overlap, "
        "slower; default 0.5).", rich_help_panel=ENGINE, show_default=False)] = None,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", help="8-way flip test-time augmentation (8× slower).",
                                      rich_help_panel=ENGINE)] = False,
    precision: Annotated[str, typer.Option(
        "--precision", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16 (CUDA only).",
        rich_help_panel=ENGINE)] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: "
                                                   "all cores).", rich_help_panel=ENGINE)] = None,
    accumulator_device: Annotated[Optional[str], typer.Option(
        "--accumulator-device", help="Where blended outputs are summed: cpu keeps them in host memory (large "
        "scans on a small GPU); default: the --device. After a CUDA out-of-memory a case is retried on the CPU "
        "anyway.", rich_help_panel=ENGINE, show_default=False)] = None,
    modality: Annotated[Optional[str], typer.Option(
        "--modality", help="ct, mri or pet: the scan's modality for text-prompted models (SAT); default: "
        "guessed from the intensities, with a warning.", rich_help_panel=ENGINE)] = None,
    folds: Annotated[Optional[str], typer.Option(
        "--folds", help="nnU-Net models: comma-separated folds to average, e.g. 0,1,2 (default: the "
        "model's folds).", rich_help_panel=ENGINE)] = None,
    nnunet_exact: Annotated[bool, typer.Option(
        "--nnunet-exact", help="nnU-Net models: accumulate windows in float16 exactly as nnU-Net does "
        "(default: float32).", rich_help_panel=ENGINE)] = False,
    gaussian: Annotated[Optional[bool], typer.Option(
        "--gaussian/--no-gaussian", help="Gaussian weighting of overlapping windows (default: the "
        "model family's own choice; Hermes averages plainly).", rich_help_panel=ENGINE,
        show_default=False)] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never download; use only weights already in the "
                                          "cache (also UNISEG_OFFLINE=1).", rich_help_panel=ENGINE)] = False,
    structures: Annotated[Optional[str], typer.Option(
        "--structures", help="Comma-separated structures to keep (default: all structures of the tasks).",
        rich_help_panel=OUTPUT)] = None,
    multilabel: Annotated[bool, typer.Option(
        "--multilabel", help="Also write segmentation.nii.gz (all structures, one label each) and labels.json; "
        "where structures overlap the task listed first wins.", rich_help_panel=OUTPUT)] = False,
    largest_component: Annotated[bool, typer.Option(
        "--largest-component", help="Keep only the largest connected component of each structure.",
        rich_help_panel=OUTPUT)] = False,
    min_component_ml: Annotated[float, typer.Option(
        "--min-component-ml", min=0.0, help="Remove connected components smaller than this many ml.",
        rich_help_panel=OUTPUT)] = 0.0,
    preview: Annotated[bool, typer.Option("--preview", help="Write preview.png: three slices with coloured "
                                          "overlays and a legend.", rich_help_panel=OUTPUT)] = False,
    statistics: Annotated[bool, typer.Option(
        "--statistics/--no-statistics", help="Write statistics.json/.csv per case (volumes, intensities, "
        "components) and a cohort table in batch runs.", rich_help_panel=OUTPUT)] = True,
    output_type: Annotated[str, typer.Option(
        "--output-type", help="nifti (one mask per structure), dicom-seg or rtstruct (DICOM inputs only).",
        rich_help_panel=OUTPUT)] = "nifti",
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="Process shard I/N (1-based) of the sorted cases; default from the job array's "
        "variables (Slurm, Kubernetes, AWS Batch, LSF, SGE, PBS: see examples/README.md).",
        rich_help_panel=BATCH)] = None,
    devices: Annotated[Optional[str], typer.Option(
        "--devices", help="Run the cases in one worker process per device, e.g. cuda:0,cuda:1, or all (every "
        "visible GPU); each case goes to whichever worker is free.", rich_help_panel=BATCH,
        show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", min=1, help="Run the cases in N CPU worker processes (the cores are split between them, "
        "or --threads each).", rich_help_panel=BATCH, show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Redo cases already marked done by an earlier run (default: skip them).",
        rich_help_panel=BATCH)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables; errors only.",
                                        rich_help_panel=REPORT)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print settings and per-case timings.",
                                          rich_help_panel=REPORT)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.",
                                        rich_help_panel=REPORT)] = False,
    json_events: Annotated[bool, typer.Option(
        "--json", help="Print JSON-lines events on stdout (human output stays on stderr).",
        rich_help_panel=REPORT)] = False,
) -> None:
    """Segment scans: one mask per structure, in each scan's original geometry."""
    console.state.quiet, console.state.verbose = quiet, verbose
    console.state.debug, console.state.json = debug, json_events
    if verbose:  # library log lines (e.g. the checkpoint keys a loader ignored) on stderr
        _log_to_stderr("unisegcli.models")
    from unisegcli.cli.reporting import RunReporter
    from unisegcli.combination import segmenter_for
    from unisegcli.outputs.writer import OutputOptions
    from unisegcli.settings import EngineOptions

    # SIGTERM (Slurm's scancel, timeouts) stops like Ctrl-C: the current case is abandoned
    # without partial files, done markers stay intact, the summary is printed.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from unisegcli.inference.host_memory import return_large_frees_to_os

    return_large_frees_to_os()  # lower peak memory on large scans (see the module)
    outputs = OutputOptions(
        structures=tuple(s.strip() for s in structures.split(",") if s.strip()) if structures is not None else None,
        multilabel=multilabel,
        largest_component=largest_component,
        min_component_ml=min_component_ml,
        preview=preview,
        statistics=statistics,
        output_type=output_type,
    )
    engine = EngineOptions(device=device, accumulator_device=accumulator_device, batch_size=batch_size, step=step,
                           tta=tta, precision=precision, threads=threads)
    family_options = {"modality": modality, "folds": _parse_folds(folds), "nnunet_exact": nnunet_exact or None,
                      "gaussian": gaussian}
    from unisegcli.workers import worker_specs

    specs = worker_specs(devices, workers, threads)
    reporter = RunReporter()
    try:
        with segmenter_for(model, tasks, compare=compare, engine=engine, options=family_options, outputs=outputs,
                           offline=offline, events=reporter) as segmenter:
            result = segmenter.run(inputs or [], output, input_list=input_list, channels=channel or (),
                                   series_uid=series, shard=shard, overwrite=overwrite, workers=specs)
    except KeyboardInterrupt:
        # Stopped between cases or mid-case: finished cases keep their outputs and markers,
        # the current one left nothing. Show what was done; the app exits with 130.
        reporter.close()
        if reporter.result is not None:
            reporter.summary(reporter.result)
        raise
    finally:
        reporter.close()
    reporter.summary(result)
    raise typer.Exit(int(result.exit_code))


def _parse_folds(text: str | None) -> tuple[int, ...] | None:
    """"0,1,2" -> (0, 1, 2); anything else is a one-line usage error."""
    if text is None:
        return None
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        folds = []
    if not folds or min(folds) < 0:
        raise UsageError(f"--folds is '{text}'; expected comma-separated fold numbers such as 0,1,2.")
    return tuple(folds)


def _log_to_stderr(name: str) -> None:
    """Show INFO lines of logger ``name`` on the current stderr (handler added once)."""
    import logging

    class StderrHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            import sys

            print(self.format(record), file=sys.stderr)

    logger = logging.getLogger(name)
    if not any(type(h).__name__ == "StderrHandler" for h in logger.handlers):
        logger.addHandler(StderrHandler())
    logger.setLevel(logging.INFO)
