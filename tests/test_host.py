"""The process's host memory (``core.host``): set up in a fresh process, as the command line does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate a 64 MiB tensor, free it, allocate another: the page faults of the second.
PROBE = """
import resource, sys
from tuneforge.core.host import keep_freed_memory
if sys.argv[1] == "set":
    print(keep_freed_memory())
import os, torch
torch.ones(1 << 24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(1 << 24)
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str, **env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env})
    return out.stdout.split()


@pytest.mark.skipif(not (sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")),
                    reason="the thresholds are glibc's")
def test_a_step_reuses_the_pages_the_one_before_freed():
    kept, thp, faults = probe("set")
    assert kept == "True" and thp == "1"
    assert int(faults) < 1000  # the freed block is reused
    _, plain = probe("plain")
    assert int(plain) > 8 * 1024  # without: 64 MiB faulted in afresh, 4 KiB at a time


def test_a_users_own_setting_is_kept():
    _, thp, _ = probe("set", THP_MEM_ALLOC_ENABLE="0")
    assert thp == "0"
