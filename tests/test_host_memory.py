"""The CLI's allocator setting: applied on Linux with glibc, skipped elsewhere."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from unisegcli.inference import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or not ctypes.util.find_library("c"),
                    reason="glibc on Linux only")
def test_applied_on_linux_glibc() -> None:
    assert host_memory.return_large_frees_to_os() is True
    assert host_memory.return_large_frees_to_os(8 << 20) is True  # may be set again


def test_left_alone_on_other_systems(monkeypatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.return_large_frees_to_os() is False


def test_allocations_still_work_after_it() -> None:
    import numpy as np

    host_memory.return_large_frees_to_os()
    a = np.ones(8 << 20, dtype=np.uint8)  # above the threshold: served by mmap
    assert int(a.sum()) == 8 << 20
