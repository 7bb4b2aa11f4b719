"""compact_heap: what a model load frees goes back to the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# In a fresh process, as `levante generate` runs a load (this test's own process has loaded
# many models and libraries before it). After a 16 MiB block is freed, glibc's own threshold
# puts 8 MiB blocks in the heap, where a freed one stays resident below live ones; within
# compact_heap each is its own map. argv[1] "on" / "off": with or without compact_heap.
SCRIPT = """
import contextlib, sys, torch
from levante.heap import compact_heap

def resident_mib():
    with open("/proc/self/status") as status:
        return int(next(l for l in status if l.startswith("VmRSS:")).split()[1]) / 1024

big = torch.ones(16 << 20, dtype=torch.uint8)
del big
keep = []
with compact_heap() if sys.argv[1] == "on" else contextlib.nullcontext():
    before = resident_mib()
    for _ in range(4):
        temporary = torch.ones(8 << 20, dtype=torch.uint8)  # touched: 8 MiB resident
        keep.append(torch.ones(64 << 10, dtype=torch.uint8))  # a live block above it
        del temporary
    print(round(resident_mib() - before, 1))
"""


def test_a_freed_temporary_leaves_no_resident_memory() -> None:
    grown = {mode: float(subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True,
                                        capture_output=True, text=True).stdout)
             for mode in ("on", "off")}
    assert grown["on"] < 4, f"within compact_heap, freed 8 MiB temporaries left {grown['on']} MiB"
    # glibc reuses some freed blocks for the next temporary: 16-32 MiB stay, measured
    assert grown["off"] >= 8, f"the control should keep its holes: {grown}"
