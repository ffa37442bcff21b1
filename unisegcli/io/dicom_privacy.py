"""Keep patient data out of everything uniseg prints: messages, logs, warnings.

DICOM headers carry patient fields (name, id, birth date...). uniseg never formats them into
text; what it does quote from elsewhere (file names, decoder errors, series descriptions)
goes through ``Redactor``, and pydicom's own warnings/log records — which can quote element
values — are silenced while we read (``quiet_pydicom``).
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# Patient fields whose values are masked in any text we quote (file names, decoder errors).
# Sex, size and weight are left out: one letter or a number would mask unrelated text, and
# we never print them anyway.
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientAge", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "OtherPatientIDs", "OtherPatientNames", "IssuerOfPatientID", "PatientComments",
    "MedicalRecordLocator", "ResponsiblePerson", "AccessionNumber", "ReferringPhysicianName",
)  # fmt: skip


@dataclass(frozen=True)
class Redactor:
    """Replaces the series' patient values (and the parts of names) by "<redacted>" in text."""

    values: tuple[str, ...] = ()

    @classmethod
    def from_datasets(cls, datasets: Sequence["Dataset"]) -> "Redactor":
        from pydicom.multival import MultiValue

        found: set[str] = set()
        for ds in datasets:
            for keyword in PATIENT_KEYWORDS:
                value = ds.get(keyword)
                items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
                for item in items:
                    text = str(item or "").strip()
                    # A person name "FAMILY^GIVEN" may also be quoted as its parts or as "FAMILY GIVEN".
                    found.update(p.strip() for p in text.replace("^", "\n").replace("=", "\n").split("\n"))
                    found.update((text, text.replace("^", " ")))
        return cls(tuple(sorted((v for v in found if len(v) >= 3), key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        for value in self.values:
            text = re.sub(re.escape(value), "<redacted>", text, flags=re.IGNORECASE)
        return text


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they can quote element values (patient data)."""
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
