"""retain_freed_memory: a freed large buffer is reused without page-faulting it in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocate and free an 80 MiB buffer (above glibc's largest mmap threshold), then allocate and touch a
# 64 MiB one and count the minor page faults of the second allocation. (The second is smaller because
# an aligned allocation asks glibc for a little more than its size, so a freed block of exactly the
# same size may not fit it.)
SCRIPT = """
import resource, sys
import torch
from tsdae.model.fast.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.ones(20 * 2**20)
del x
before = faults()
x = torch.ones(16 * 2**20)
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_large_buffer_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    assert default > 1000  # 64 MiB of fresh pages: thousands of faults (16,384 at 4 KiB pages)
    assert retained < default / 10
