"""The one-call convenience: ``segment(...)`` builds a ``Segmenter``, runs it over files, closes it.

    from unisegcli.api import segment
    result = segment(["scan.nii.gz"], "liver,kidney", output="out/")
    result.cases[0].volumes_ml["liver"]

For many calls (notebooks, services) keep one ``unisegcli.Segmenter``: the weights load once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, TextIO

from unisegcli.combination import Combination, segmenter_for
from unisegcli.events import Events
from unisegcli.models.families import RunSettings
from unisegcli.outputs.writer import OutputOptions
from unisegcli.results import CaseFailure, CaseResult, Result, Segmentation
from unisegcli.session import Segmenter
from unisegcli.settings import EngineOptions

__all__ = ["CaseFailure", "CaseResult", "Combination", "EngineOptions", "Events", "OutputOptions", "Result",
           "RunSettings", "Segmentation", "Segmenter", "segment"]


def segment(
    inputs: Iterable[str | Path] | str | Path,
    tasks: str | Sequence[str],
    *,
    output: str | Path,
    model: str = "uniseg",
    device: str = "auto",
    batch_size: int | None = None,
    step: float | None = None,
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
    compare: str | Sequence[str] | None = None,
) -> Result:
    """Segment scans with a model; write masks, statistics and other outputs into ``output``.

    inputs: NIfTI files, folders, globs or DICOM series. tasks: "liver,kidney" or a list of
    names/aliases. device ... threads: the engine options (``EngineOptions``); modality, folds,
    nnunet_exact, gaussian: family options (an option the model's family does not have is a
    UsageError). model: "a,b" runs several models and compare: structures to compare between
    them (``unisegcli.combination``). Raises the domain errors of ``unisegcli.errors`` for problems of the run itself,
    and for the failure of a single-case run; in a batch, failed cases are recorded in
    ``Result.failures`` and ``OUT/failures.jsonl``.
    """
    engine = EngineOptions(device=device, batch_size=batch_size, step=step, tta=tta, precision=precision,
                           threads=threads)
    options = {"modality": modality, "folds": tuple(folds) if folds is not None else None,
               "nnunet_exact": nnunet_exact or None, "gaussian": gaussian}
    compared = compare if compare is None or isinstance(compare, str) else ",".join(compare)
    with segmenter_for(model, tasks, compare=compared, engine=engine, options=options, outputs=outputs,
                       offline=offline, events=events) as segmenter:
        return segmenter.run(inputs, output, input_list=input_list, channels=channels, series_uid=series_uid,
                             shard=shard, overwrite=overwrite, stdin=stdin)
