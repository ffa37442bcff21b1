"""uniseg: run universal medical-image segmentation models on CT, MR and PET scans."""

from __future__ import annotations

__version__ = "0.1.0"
