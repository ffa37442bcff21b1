"""The SAT family (text-prompted segmentation over a 498-term vocabulary); see SAT_SPEC facts
in each module. Importing this package loads torch; the CLI imports it only when needed."""

from unisegcli.models.sat.config import NANO, PRO, SatConfig, TextConfig
from unisegcli.models.sat.loader import SatModel, load_sat

__all__ = ["NANO", "PRO", "SatConfig", "SatModel", "TextConfig", "load_sat"]
