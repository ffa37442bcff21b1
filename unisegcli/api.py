"""The Python API: ``segment(...)``. The CLI is a thin shell over it.

    from unisegcli.api import segment
    result = segment(["scan.nii.gz"], "liver,kidney", output="out/")
    result.cases[0].volumes_ml["liver"]

Order of work: everything cheap that can be wrong (model, tasks, options, inputs, output
folder, device) is checked before the weights are loaded. The network is loaded once per
process; cases then run read -> preprocess -> sliding window (all tasks of a case in one
pass, one encoder per channel group) -> restore -> write, while the next case is read on a
background thread. One case writes into ``OUT/``; several into ``OUT/<case_id>/``. In a
batch, a failing case is logged to ``OUT/failures.jsonl`` and the others go on; a single
case raises its error.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence, TextIO

import numpy as np

from unisegcli.errors import DeviceError, ExitCode, UnisegError, UsageError
from unisegcli.io.cases import LoadedCase, read_case, task_channels
from unisegcli.io.discovery import CaseInput, discover
from unisegcli.io.nifti import check_output_dir
from unisegcli.io.sharding import parse_shard, select_shard
from unisegcli.weights.cards import ModelCard, TaskCard
from unisegcli.weights.resolver import get_model
from unisegcli.models.families import resolve_tasks
from unisegcli.outputs import markers
from unisegcli.outputs.writer import OutputOptions

if TYPE_CHECKING:
    import torch


@dataclass
class CaseResult:
    """What one case produced: output files, volumes per structure, and timings."""

    case_id: str
    input_path: Path
    output_dir: Path
    masks: dict[str, Path]
    volumes_ml: dict[str, float]
    seconds: float
    files: list[Path] = field(default_factory=list)  # every file written for the case


@dataclass
class CaseFailure:
    """A case that failed in a batch: what went wrong, in one line."""

    case_id: str
    input_path: Path
    error: str
    message: str
    exit_code: int


@dataclass
class Result:
    """The outcome of a run: each case done, skipped (already done) or failed."""

    model: ModelCard
    tasks: tuple[TaskCard, ...]
    device: str
    output: Path
    cases: list[CaseResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)
    interrupted: bool = False

    @property
    def exit_code(self) -> ExitCode:
        """OK; INTERRUPTED; ALL_FAILED when nothing succeeded; PARTIAL when some cases failed."""
        if self.interrupted:
            return ExitCode.INTERRUPTED
        if not self.failures:
            return ExitCode.OK
        return ExitCode.PARTIAL if (self.cases or self.skipped) else ExitCode.ALL_FAILED


class Events:
    """Progress hooks the API calls; the CLI subclasses this for bars and JSON events."""

    quiet = True  # no download progress bar unless a subclass shows progress

    def downloading(self, model: ModelCard) -> None:
        """Before the first download of a model's weights (show its license)."""

    def run_started(self, model: ModelCard, tasks: Sequence[TaskCard], cases: Sequence[CaseInput], device: str) -> None:
        """Before the first case."""

    def case_started(self, case: CaseInput, number: int, total: int) -> None:
        """Before a case is predicted."""

    def windows(self, done: int, total: int) -> None:
        """Sliding-window progress inside the current case."""

    def case_done(self, result: CaseResult) -> None:
        """After all outputs of a case were written."""

    def case_skipped(self, case: CaseInput, folder: Path) -> None:
        """A case already done by an earlier run (resume)."""

    def case_failed(self, failure: CaseFailure) -> None:
        """A case failed; the batch goes on."""

    def warning(self, case_id: str, message: str) -> None:
        """A scan is legal but suspicious for its task (see preprocessing.sanity)."""

    def run_finished(self, result: Result) -> None:
        """After the last case (also after an interrupt)."""


@dataclass(frozen=True)
class RunSettings:
    """How to run the network (the CLI's engine options)."""

    device: str = "auto"
    batch_size: int | None = None
    step: float = 0.5
    tta: bool = False
    precision: str = "auto"
    # Family-specific (None: the family's own default; other families ignore them).
    modality: str | None = None  # ct, mri or pet (SAT's prompts)
    folds: tuple[int, ...] | None = None  # nnU-Net folds to average
    nnunet_exact: bool = False  # nnU-Net's own float16 accumulation
    gaussian: bool | None = None  # Gaussian window blending (Hermes: off by default)


def segment(
    inputs: Iterable[str | Path] | str | Path,
    tasks: str | Sequence[str],
    *,
    output: str | Path,
    model: str = "uniseg",
    device: str = "auto",
    batch_size: int | None = None,
    step: float = 0.5,
    tta: bool = False,
    precision: str = "auto",
    threads: int | None = None,
    offline: bool = False,
    outputs: OutputOptions | None = None,
    input_list: str | Path | None = None,
    channels: Sequence[str] = (),
    series_uid: str | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    events: Events | None = None,
    stdin: TextIO | None = None,
    modality: str | None = None,
    folds: Sequence[int] | None = None,
    nnunet_exact: bool = False,
    gaussian: bool | None = None,
) -> Result:
    """Segment scans with a registry model; write masks, statistics and other outputs.

    inputs: NIfTI files, folders, globs or DICOM series. tasks: "liver,kidney" or a list of
    names/aliases. Raises the domain errors of ``unisegcli.errors`` for problems of the run
    itself, and for the failure of a single-case run; in a batch, failed cases are recorded
    in ``Result.failures`` and ``OUT/failures.jsonl``.
    """
    events = events or Events()
    outputs = outputs or OutputOptions()
    outputs.check()
    settings = RunSettings(device, batch_size, step, tta, precision, modality=modality,
                           folds=tuple(folds) if folds is not None else None,
                           nnunet_exact=nnunet_exact, gaussian=gaussian)
    if not 0 < step <= 1:
        raise UsageError(f"--step is {step}; expected a fraction of the patch in (0, 1], e.g. 0.5.")
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    card = get_model(model)
    task_cards = resolve_tasks(card, tasks)
    shard_spec = parse_shard(shard)
    all_cases = discover(
        list(inputs), input_list=input_list, channels=channels,
        channels_needed=max(len(t.channels) for t in task_cards), stdin=stdin,
    )
    cases = select_shard(all_cases, shard_spec)
    single = len(all_cases) == 1
    out_root = check_output_dir(Path(output))
    torch_device = resolve_device(device)
    from unisegcli.inference.engine import autocast_dtype

    autocast_dtype(precision, torch_device)  # an unknown or unsupported precision fails now
    if threads:
        import torch

        torch.set_num_threads(threads)

    result = Result(model=card, tasks=task_cards, device=str(torch_device), output=out_root)
    options_record = {"outputs": asdict(outputs), "step": step, "tta": tta}
    family_options = {"modality": modality, "folds": settings.folds, "nnunet_exact": nnunet_exact,
                      "gaussian": gaussian}
    # only options that were given: markers written before these options existed stay valid
    options_record.update({k: v for k, v in family_options.items() if v not in (None, False)})
    from unisegcli.outputs.writer import check_inputs_spared, output_names, select_structures

    names = list(output_names(select_structures(outputs.structures, [s for t in task_cards for s in t.structures]),
                              outputs).values())
    every_input = [p for case in all_cases for p in case.paths]
    todo: list[tuple[CaseInput, Path, dict[str, Any]]] = []
    blocked: list[tuple[CaseInput, UnisegError]] = []
    for case in cases:
        folder = out_root if single else out_root / case.case_id
        try:
            check_inputs_spared(folder, names, every_input)
        except UnisegError as exc:
            if single:
                raise
            blocked.append((case, exc))  # recorded as failed once the run has started
            continue
        record = markers.marker_record(card.name, card.version, [t.name for t in task_cards],
                                       options_record, case.paths)
        if not overwrite and markers.is_done(folder, record):
            result.skipped.append(case.case_id)
            events.case_skipped(case, folder)
            continue
        todo.append((case, folder, record))

    if not todo:  # everything done before: no model work at all
        events.run_started(card, task_cards, cases, str(torch_device))
        _record_blocked(blocked, result, events, out_root)
        events.run_finished(result)
        return result
    # A single case is read (and its channels checked) before the slow weights load, so a
    # bad scan fails fast with its own exit code.
    first: LoadedCase | None = None
    if single:
        first = read_case(todo[0][0], series_uid)
        for task in task_cards:
            task_channels(first, task)
    net = load_network(card, offline=offline, events=events, settings=settings, tasks=task_cards)
    events.run_started(card, task_cards, cases, str(torch_device))
    _record_blocked(blocked, result, events, out_root)
    try:
        _run_cases(todo, first, task_cards, net, settings, outputs, series_uid,
                   out_root, single, result, events, torch_device, card.family)
    except KeyboardInterrupt:
        result.interrupted = True
        events.run_finished(result)
        raise
    events.run_finished(result)
    return result


def _run_cases(
    todo: list[tuple[CaseInput, Path, dict[str, Any]]],
    first: LoadedCase | None,
    tasks: Sequence[TaskCard],
    net: Any,
    settings: RunSettings,
    outputs: OutputOptions,
    series_uid: str | None,
    out_root: Path,
    single: bool,
    result: Result,
    events: Events,
    device: "torch.device",
    family: str = "uniseg",
) -> None:
    """Run each case; the next case is read on a background thread meanwhile."""

    def load(case: CaseInput) -> LoadedCase:
        return first if first is not None and first.case == case else read_case(case, series_uid)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="uniseg-read") as pool:
        pending: Future[LoadedCase] = pool.submit(load, todo[0][0])
        for number, (case, folder, record) in enumerate(todo, start=1):
            current = pending
            if number < len(todo):
                pending = pool.submit(load, todo[number][0])
            events.case_started(case, number, len(todo))
            started = time.perf_counter()
            try:
                loaded = current.result()
                markers.clear_marker(folder)
                case_result = run_case(loaded, tasks, net, folder, settings=settings, outputs=outputs,
                                       device=device, progress=events.windows, warn=events.warning,
                                       cohort_folder=None if single else out_root, family=family)
                markers.write_marker(folder, record, case_result.files)
            except UnisegError as exc:
                if single:
                    raise
                _record_failure(result, events, out_root, case, type(exc).__name__, str(exc), int(exc.exit_code))
                continue
            case_result.seconds = time.perf_counter() - started
            result.cases.append(case_result)
            events.case_done(case_result)


def _record_blocked(blocked: Sequence[tuple[CaseInput, UnisegError]], result: Result, events: Events,
                    out_root: Path) -> None:
    for case, exc in blocked:
        _record_failure(result, events, out_root, case, type(exc).__name__, str(exc), int(exc.exit_code))


def _record_failure(result: Result, events: Events, out_root: Path, case: CaseInput,
                    error: str, message: str, code: int) -> None:
    failure = CaseFailure(case.case_id, case.path, error, message, code)
    result.failures.append(failure)
    markers.log_failure(out_root, {"case_id": case.case_id, "input": str(case.path),
                                   "error": error, "message": message, "exit_code": code})
    events.case_failed(failure)


def resolve_device(spec: str) -> "torch.device":
    """Turn --device into a torch device; raises DeviceError when it is not available."""
    from unisegcli.inference.engine import resolve_device as _resolve

    return _resolve(spec)


def load_network(
    card: ModelCard,
    *,
    offline: bool = False,
    events: Events | None = None,
    settings: RunSettings | None = None,
    tasks: Sequence[TaskCard] = (),
) -> Any:
    """Fetch (or find) the model's files and build its network in eval mode on the CPU.

    A first use downloads the missing files (unless offline), after ``events.downloading``
    has shown the model's license; the download bar is shown unless ``events.quiet``. Only
    the files the family needs for ``tasks`` are fetched (all of them by default).
    """
    from unisegcli.weights import cache
    from unisegcli.weights.download import ensure_model, offline_from_env
    from unisegcli.models.families import family_module, needed_roles

    events = events or Events()
    offline = offline or offline_from_env()
    family = family_module(card.family)  # an unsupported family fails before any download
    roles = needed_roles(card, tasks) if tasks else None
    if not offline and not card.packaged and cache.missing_files(card, roles=roles):
        events.downloading(card)
    files = ensure_model(card, offline=offline, quiet=events.quiet, roles=roles)
    return family.load(card, files, settings=settings or RunSettings(), tasks=tasks)


def predict_label_maps(
    loaded: LoadedCase,
    tasks: Sequence[TaskCard],
    net: Any,
    *,
    settings: RunSettings,
    device: "torch.device",
    progress: Any = None,
    warn: Any = None,
    family: str = "uniseg",
) -> dict[str, np.ndarray]:
    """{task name: uint8 [Z, Y, X] label map} for one case, by the model family's predictor.

    warn(case_id, message) receives input sanity warnings (suspicious but legal scans).
    """
    from unisegcli.models.families import family_module

    return family_module(family).predict(loaded, tasks, net, settings=settings, device=device,
                                         progress=progress, warn=warn)


def run_case(
    loaded: LoadedCase,
    tasks: Sequence[TaskCard],
    net: Any,
    folder: Path,
    *,
    settings: RunSettings,
    outputs: OutputOptions,
    device: "torch.device",
    progress: Any = None,
    warn: Any = None,
    cohort_folder: Path | None = None,
    family: str = "uniseg",
) -> CaseResult:
    """Predict all tasks of one case in one pass and write its outputs (all-or-nothing)."""
    from unisegcli.outputs.masks import LabelMasks
    from unisegcli.outputs.writer import write_case_outputs

    started = time.perf_counter()
    try:
        label_maps = predict_label_maps(loaded, tasks, net, settings=settings, device=device,
                                        progress=progress, warn=warn, family=family)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(exc, MemoryError) and "out of memory" not in str(exc).lower():
            raise
        raise DeviceError(
            f"out of memory on {device} while segmenting '{loaded.case.case_id}' "
            f"(batch size {settings.batch_size or 'auto'}); expected the windows to fit. Lower "
            "--batch-size, use --precision fp16 on a GPU, or run on a machine with more memory."
        ) from exc
    where: dict[str, tuple[str, int]] = {}
    task_of: dict[str, str] = {}
    for task in tasks:
        for index, structure in task.labels.items():
            where[structure] = (task.name, index)
            task_of[structure] = task.name
    written = write_case_outputs(
        loaded.scan, LabelMasks(label_maps, where), folder, outputs,
        task_of=task_of,
        dicom_source=loaded.dicom,
        case_id=loaded.case.case_id,
        channel_names=loaded.channel_names or _channel_names(loaded, tasks),
        modality=tasks[0].modality.split("+")[0],
        cohort_folder=cohort_folder,
    )
    return CaseResult(
        case_id=loaded.case.case_id,
        input_path=loaded.case.path,
        output_dir=folder,
        masks=dict(written.masks),
        volumes_ml=dict(written.volumes_ml),
        seconds=time.perf_counter() - started,
        files=list(written.files),
    )


def _channel_names(loaded: LoadedCase, tasks: Sequence[TaskCard]) -> tuple[str, ...] | None:
    """Unnamed channels take the names of the task whose channel count matches the scan."""
    count = loaded.scan.data.shape[0]
    return next((tuple(t.channels) for t in tasks if len(t.channels) == count), None)
