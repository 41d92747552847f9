"""kronos_model.cpu_memory: buffers a forecast frees are reused by the next one instead of being faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys, torch
from kronos_model.cpu_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "tuned" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # what a batched generation step does: several large buffers alive at once, then freed
    buffers = [torch.ones(5_000_000) for _ in range(4)]  # 20 MB each
    del buffers
step()
before = faults()
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_are_reused_without_page_faults():
    default, tuned = run("default"), run("tuned")
    assert tuned["applied"] is True
    pages = 4 * 20_000_000 // 4096  # one step's buffers
    # glibc's defaults give freed buffers back to the kernel, so later steps fault their pages in again; kept in
    # the heap, the warm-up step's pages serve every later step
    assert default["faults"] >= pages, default
    # (a few buffers may still land on fresh pages once: less than one step's worth over five steps)
    assert tuned["faults"] < pages and tuned["faults"] * 3 < default["faults"], (tuned, default)
