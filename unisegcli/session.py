"""``Segmenter``: resolve the model, tasks, options and device once, load the network once, then
segment many scans — in memory (``predict``) or as a batch of files (``run``).

    with Segmenter("uniseg", "liver,kidney", device="cuda") as seg:   # weights load once
        result = seg.predict(nib.load("scan.nii.gz"))                   # in memory
        result.masks["liver"]                                            # uint8, input geometry
        seg.run(["scans/"], "out/")                                      # batch, resume, shards

Everything cheap that can be wrong (model, tasks, family options, output options, device,
precision) is checked in ``__init__``; the weights load on first use (``load()``), so a batch
run checks its inputs and output folder first. ``close()`` frees the network and restores the
torch settings the Segmenter changed (CPU threads).

For a family that runs in stages, ``segment_case`` is ``prepare_case`` (CPU, any thread) ->
``infer_case`` (the network) -> ``finish_case`` (CPU, any thread); a batch overlaps them across
cases (``unisegcli.staged_batch``). Each stage's seconds go to ``Segmentation.timings``.

On a CUDA out-of-memory (``torch.OutOfMemoryError``) a case is predicted again (only its
network stage, for a staged family) with the accumulators in host memory, then with one window
per forward, and only then fails with a ``DeviceError`` that names ``--device cpu`` (nnU-Net's
predictor retries on the CPU the same way); ``Events.case_retry`` reports each retry.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, TextIO, TypeVar

from unisegcli.errors import DeviceError, HostMemoryError
from unisegcli.events import Events
from unisegcli.models.families import RunSettings, family
from unisegcli.outputs.writer import OutputOptions, select_structures
from unisegcli.results import Result, Segmentation
from unisegcli.settings import EngineOptions
from unisegcli.weights.resolver import get_model

if TYPE_CHECKING:
    import torch

    from unisegcli.io.cases import LoadedCase
    from unisegcli.workers import WorkerSpec

T = TypeVar("T")


@dataclass(frozen=True)
class SessionConfig:
    """What builds a Segmenter (picklable: worker processes build their own from it)."""

    model: str
    tasks: str | tuple[str, ...]
    engine: EngineOptions
    options: dict[str, Any]
    outputs: OutputOptions
    offline: bool

    def build(self, *, device: str | None = None, threads: int | None = None,
              events: Events | None = None) -> "Segmenter":
        engine = self.engine if threads is None else replace(self.engine, threads=threads)
        return Segmenter(self.model, self.tasks, device=device, engine=engine, options=self.options,
                         outputs=self.outputs, offline=self.offline, events=events)


class Segmenter:
    """One model with its tasks and settings, loaded once, for many scans (see the module)."""

    def __init__(
        self,
        model: str = "uniseg",
        tasks: str | Sequence[str] = "",
        *,
        device: str | None = None,
        engine: EngineOptions | None = None,
        options: Mapping[str, Any] | None = None,
        outputs: OutputOptions | None = None,
        offline: bool = False,
        events: Events | None = None,
        network: Any = None,
    ) -> None:
        """model: a registry name, an imported model or ``nnunet:<folder>``. tasks: "liver,kidney"
        or a list. device: overrides ``engine.device``. options: the family's own options (e.g.
        ``{"modality": "ct"}`` for SAT; an option the family does not declare is a UsageError).
        network: an already built network to use instead of loading the weights."""
        engine = engine or EngineOptions()
        if device is not None:
            engine = replace(engine, device=device)
        engine.check()
        self.config = SessionConfig(model, tasks if isinstance(tasks, str) else tuple(tasks), engine,
                                    dict(options or {}), outputs or OutputOptions(), offline)
        self.engine = engine
        self.outputs = outputs or OutputOptions()
        self.outputs.check()
        self.events = events or Events()
        self.offline = offline
        self.card = get_model(model)
        self.family = family(self.card.family)
        self.tasks = self.family.resolve_tasks(self.card, tasks)
        self.settings: RunSettings = self.family.settings(
            options, batch_size=engine.batch_size, step=engine.step, tta=engine.tta, precision=engine.precision,
            accumulator_device=engine.accumulator_device)
        # the structures written, in pipeline order (an unknown --structures name fails now)
        self.structures = select_structures(self.outputs.structures, [s for t in self.tasks for s in t.structures])
        self.device = _resolve_device(engine)
        self.family.check(self.card, self.tasks, self.settings)
        self._network = network
        self.started = time.time()  # a batch removes temp files older than this (casework)
        self.loads = 0  # how many times the weights were loaded (once, or 0 with ``network``)
        self._threads_before: int | None = None
        if engine.threads:
            import torch

            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(int(engine.threads))

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> Any:
        """The network, loading the weights on first use (downloading them unless offline)."""
        if self._network is None:
            self._network = load_network(self)
            self.loads += 1
        return self._network

    def close(self) -> None:
        """Drop the network, free cached GPU memory and restore torch's thread count."""
        self._network = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    def __enter__(self) -> "Segmenter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- work -----------------------------------------------------------------------------

    def predict(self, image: Any, affine: Any = None, *, case_id: str = "case") -> Segmentation:
        """Segment one scan in memory: a path, a nibabel image, a numpy array [i, j, k] with its
        4x4 ``affine``, or a mapping channel -> any of these. Nothing is written."""
        from unisegcli.io.cases import case_in_memory, dicom_channels

        started = time.perf_counter()
        loaded = case_in_memory(image, affine, case_id=case_id, channels=dicom_channels(self.tasks))
        read_s = time.perf_counter() - started
        return self.segment_case(loaded, timings={"read": read_s})

    def segment_case(self, loaded: "LoadedCase", *, timings: dict[str, float] | None = None) -> Segmentation:
        """Predict every task of an already read case (the batch run's per-case step): the three
        stages in turn for a staged family, else the family's ``predict``."""
        if self.staged:
            return self.finish_case(self.infer_case(self.prepare_case(loaded, timings=timings)))
        warnings: list[str] = []

        def warn(case_id: str, message: str) -> None:
            warnings.append(message)
            self.events.warning(case_id, message)

        started = time.perf_counter()
        net = self.load()
        label_maps = self._with_fallback(loaded, lambda settings, first: self.family.predict(
            loaded, self.tasks, net, settings=settings, device=self.device, progress=self.events.windows,
            warn=warn if first else None))
        timings = dict(timings or {}, predict=time.perf_counter() - started)
        return Segmentation(loaded, tuple(self.tasks), label_maps, self.outputs, warnings, timings)

    # -- the stages of segment_case (a batch overlaps them across cases: staged_batch) -------

    @property
    def staged(self) -> bool:
        """Whether the family runs in stages (``prepare_case``/``infer_case``/``finish_case``)."""
        return self.family.staged

    def prepare_case(self, loaded: "LoadedCase", *, timings: dict[str, float] | None = None) -> "StagedCase":
        """CPU work before the network (any thread). Input warnings are kept for ``infer_case``
        to send, so events stay on the caller's thread and in case order."""
        warnings: list[str] = []
        started = time.perf_counter()
        net = self.load()
        import torch

        with _host_memory(loaded):
            try:
                prepared = self.family.prepare_case(loaded, self.tasks, net, settings=self.settings,
                                                    device=self.device,
                                                    warn=lambda _case_id, message: warnings.append(message))
            except torch.OutOfMemoryError:
                raise DeviceError(f"out of memory on {self.device} while preparing '{loaded.case.case_id}' for the "
                                  "network; expected the scan to fit beside the case in the network. Run with "
                                  "--device cpu, or on a GPU with more memory.") from None
        timings = dict(timings or {}, prepare=time.perf_counter() - started)
        return StagedCase(loaded, prepared, warnings=warnings, timings=timings)

    def infer_case(self, staged: "StagedCase") -> "StagedCase":
        """The network on a prepared case (the out-of-memory ladder retries this stage only);
        ``timings["network"]`` is its wall time in seconds."""
        for message in staged.warnings:
            self.events.warning(staged.loaded.case.case_id, message)
        started = time.perf_counter()
        net = self.load()
        staged.raw = self._with_fallback(staged.loaded, lambda settings, _first: self.family.infer_case(
            staged.prepared, net, settings=settings, device=self.device, progress=self.events.windows))
        staged.timings["network"] = time.perf_counter() - started
        return staged

    def finish_case(self, staged: "StagedCase") -> Segmentation:
        """Restore a case to the scan's grid (any thread) -> its Segmentation."""
        import torch

        started = time.perf_counter()
        with _host_memory(staged.loaded):
            try:
                label_maps = self.family.finish_case(staged.prepared, staged.raw)
            except torch.OutOfMemoryError:  # the GPU also holds the next case's windows: restore on the host
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                label_maps = self.family.finish_case(staged.prepared, _on_host(staged.raw))
        staged.prepared = staged.raw = None  # the network-grid arrays go now, not with the result
        timings = dict(staged.timings, finish=time.perf_counter() - started)
        timings["predict"] = timings["prepare"] + timings["network"] + timings["finish"]
        return Segmentation(staged.loaded, tuple(self.tasks), label_maps, self.outputs, staged.warnings, timings)

    def run(self, inputs: Iterable[str | Path] | str | Path, output: str | Path, *,
            input_list: str | Path | None = None, channels: Sequence[str] = (), series_uid: str | None = None,
            shard: str | None = None, overwrite: bool = False, stdin: TextIO | None = None,
            workers: Sequence[WorkerSpec] = ()) -> Result:
        """Segment files into ``output`` (see ``unisegcli.batch``): discovery, resume markers,
        shards, ``failures.jsonl``, the cohort statistics table and events. workers: run the
        cases in these worker processes (``unisegcli.workers.worker_specs``; one Segmenter
        each, cases to whichever is free) instead of in this process."""
        from unisegcli.batch import BatchRequest, run_batch

        request = BatchRequest([inputs] if isinstance(inputs, (str, Path)) else list(inputs), Path(output),
                               input_list=input_list, channels=tuple(channels), series_uid=series_uid,
                               shard=shard, overwrite=overwrite, stdin=stdin, workers=tuple(workers))
        return run_batch(self, request)

    def marker_options(self) -> dict[str, Any]:
        """The settings a done marker records: output options and the values actually used."""
        from dataclasses import asdict

        record: dict[str, Any] = {"outputs": asdict(self.outputs), "tta": self.settings.tta}
        if "step" in self.family.engine_options:
            record["step"] = self.settings.step_or_default
        for name, value in self.settings.options.items():
            record[name] = list(value) if isinstance(value, tuple) else value
        return record

    def _with_fallback(self, loaded: "LoadedCase", call: Callable[[RunSettings, bool], T]) -> T:
        """call(settings, first_attempt) down the out-of-memory ladder (``fallback_settings``)."""
        import torch

        ladder = fallback_settings(self.settings, self.device)
        for attempt, (reason, settings) in enumerate(ladder):
            try:
                with _host_memory(loaded):
                    return call(settings, attempt == 0)
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if attempt + 1 < len(ladder):
                    following = ladder[attempt + 1][0]
                    self.events.case_retry(loaded.case.case_id, "out_of_memory",
                                           f"out of memory on {self.device}; retrying with {following}")
                    continue
                raise DeviceError(self._oom_message(loaded, ladder)) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _oom_message(self, loaded: "LoadedCase", ladder: Sequence[tuple[str | None, RunSettings]]) -> str:
        tried = ", then ".join(r for r, _ in ladder[1:] if r) or "no lighter setting left"
        return (f"out of memory on {self.device} while segmenting '{loaded.case.case_id}' (tried {tried}); "
                "expected the windows to fit. Run with --device cpu, or on a GPU with more memory.")


@dataclass
class StagedCase:
    """A case between the stages of ``Segmenter``: prepared (CPU), then its network outputs."""

    loaded: "LoadedCase"
    prepared: Any  # the family's prepare_case output (None once finished)
    raw: Any = None  # the family's infer_case output
    warnings: list[str] = field(default_factory=list)  # input warnings, sent by infer_case
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, prepare, network, finish


def _on_host(raw: Any) -> Any:
    """``raw`` with every torch tensor in it (nested lists and tuples) moved to the CPU."""
    if isinstance(raw, (list, tuple)):
        return type(raw)(_on_host(item) for item in raw)
    return raw.cpu() if hasattr(raw, "cpu") else raw


@contextmanager
def _host_memory(loaded: "LoadedCase") -> Iterator[None]:
    """A MemoryError while segmenting as HostMemoryError (one case fails, not the batch)."""
    try:
        yield
    except MemoryError:
        raise HostMemoryError(f"out of host memory while segmenting '{loaded.case.case_id}' "
                              f"({loaded.scan.data.shape[1:]} voxels); expected the scan to fit. Run on a "
                              "machine with more memory.") from None


def fallback_settings(settings: RunSettings, device: "torch.device") -> list[tuple[str | None, RunSettings]]:
    """The out-of-memory ladder: (what changed, settings) — as given, then accumulators in host
    memory (CUDA only), then one window per forward (unless that is what already ran)."""
    ladder: list[tuple[str | None, RunSettings]] = [(None, settings)]
    if device.type == "cuda" and settings.accumulator_device != "cpu":
        ladder.append(("accumulators on the CPU", replace(settings, accumulator_device="cpu")))
    batch_is_one = settings.batch_size == 1 or (settings.batch_size is None and device.type != "cuda")
    if not batch_is_one:
        ladder.append(("batch size 1", replace(ladder[-1][1], batch_size=1)))
    return ladder


def _resolve_device(engine: EngineOptions) -> "torch.device":
    """--device as a torch device that exists; the precision must suit it."""
    from unisegcli.inference.engine import autocast_dtype, resolve_device

    device = resolve_device(engine.device)
    autocast_dtype(engine.precision, device)  # bf16 on a GPU without it fails now
    if engine.accumulator_device is not None:
        resolve_device(engine.accumulator_device)
    return device


def load_network(segmenter: Segmenter) -> Any:
    """Fetch (or find) the model's files and build its network in eval mode on the CPU.

    A first use downloads the missing files (unless offline), after ``events.downloading`` has
    shown the model's license; only the files the family needs for the tasks are fetched.
    """
    from unisegcli.models.families import needed_roles
    from unisegcli.weights import cache
    from unisegcli.weights.download import ensure_model, offline_from_env

    card, events = segmenter.card, segmenter.events
    offline = segmenter.offline or offline_from_env()
    roles = needed_roles(card, segmenter.tasks)
    if not offline and not card.packaged and cache.missing_files(card, roles=roles):
        events.downloading(card)
    files = ensure_model(card, offline=offline, progress=events.download_progress, roles=roles)
    return segmenter.family.load(card, files, settings=segmenter.settings, tasks=segmenter.tasks)
