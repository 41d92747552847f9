"""What makes a training step cheaper without changing what is learned: cached predictor targets, bf16 autocast
and torch.compile, each chosen where it measured faster (benchmarks/train_throughput.py).

- The predictor stage trains against the frozen tokenizer's codes. They never change during the stage, so
  `TokenCache` encodes each window once (the first time it is drawn, in the batch it is drawn in: the very
  computation the uncached loop does) and reuses the ids afterwards: same targets, same loss curve.
- bf16 autocast (`bf16: auto`) is used on CUDA, and on a CPU with native bf16 dot products (AVX512-BF16 or
  AMX) only for a module wide enough that its matmuls outweigh the casts around them:
  benchmarks/train_throughput.py measured CPU autocast at 0.19-0.46x of fp32 for the 64-wide demo model and
  above 1 for the 256/512-wide Kronos-Tokenizer-base and Kronos-small. Weights, gradients and optimizer
  state stay fp32 (autocast casts per op).
- torch.compile (`compile: auto`) fuses the elementwise work around the matmuls (dropout, RMSNorm, rotary,
  SwiGLU, the attention softmax that dropout keeps off the fused kernel), which is about half of a
  Kronos-small step on a CPU. Compiling takes minutes, so `auto` compiles only wide modules in stages of at
  least COMPILE_MIN_STEPS optimizer steps. Compiled dropout draws other random numbers than eager dropout (the
  same distribution): such a run's loss curve equals the eager one within noise, not bit for bit.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Literal

import torch

Ids = tuple[torch.Tensor, torch.Tensor]  # (s1, s2)

# Narrowest d_model for which CPU bf16 autocast is chosen by `bf16: auto` (the demo model is 64 wide).
CPU_BF16_MIN_WIDTH = 256
# `compile: auto` compiles modules at least this wide in stages of at least this many optimizer steps.
COMPILE_MIN_WIDTH = 256
COMPILE_MIN_STEPS = 100


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: bf16 matmuls at about twice the fp32 rate; without them autocast only adds casts."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay in fp32
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(setting: Literal["auto"] | bool, device: str, width: int) -> bool:
    """Whether a stage trains under bf16 autocast: `true`/`false` as configured; `auto` on CUDA always, on a CPU
    when it has native bf16 and the trained module is at least CPU_BF16_MIN_WIDTH wide."""
    if setting != "auto":
        return bool(setting)
    if device.startswith("cuda"):
        return True
    return device == "cpu" and width >= CPU_BF16_MIN_WIDTH and cpu_has_native_bf16()


def use_compile(setting: Literal["auto"] | bool, width: int, steps: int) -> bool:
    """Whether a stage's training forward is compiled: as configured, or (auto) when it is wide and long enough
    for the minutes of compiling to pay off."""
    if setting != "auto":
        return bool(setting)
    has_compiler = any(shutil.which(name) for name in ("g++", "c++", "clang++"))  # inductor builds C++ on a CPU
    return width >= COMPILE_MIN_WIDTH and steps >= COMPILE_MIN_STEPS and has_compiler


class TokenCache:
    """(s1, s2) ids of the windows of one dataset, filled the first time each window is drawn.

    Ids are kept on the CPU in int16 (int32 above 15 bits); a dataset whose ids would exceed `limit_bytes` is
    not cached (`enabled` false) and every batch is encoded as without a cache.
    """

    def __init__(self, windows: int, length: int, bits: int, limit_bytes: int):
        self.dtype = torch.int16 if bits <= 15 else torch.int32
        self.size_bytes = 2 * windows * length * self.dtype.itemsize
        self.enabled = self.size_bytes <= limit_bytes
        shape = (windows, length) if self.enabled else (0, length)
        self.s1 = torch.empty(shape, dtype=self.dtype)
        self.s2 = torch.empty(shape, dtype=self.dtype)
        self.filled = torch.zeros(shape[0], dtype=torch.bool)
        self.encoded = 0  # windows encoded so far (for the log and the tests)

    def tokens(self, indices: list[int], x: torch.Tensor, encode: Callable[[torch.Tensor], Ids]) -> Ids:
        """The ids of the windows `indices` (whose inputs are the rows of `x`), encoding those not seen yet."""
        if not self.enabled:
            return encode(x)
        where = torch.as_tensor(indices, dtype=torch.long)
        missing = (~self.filled[where]).nonzero().squeeze(1)
        if len(missing):
            # a whole batch of new windows is encoded exactly as the uncached loop would encode it
            s1, s2 = encode(x if len(missing) == len(where) else x[missing.to(x.device)])
            rows = where[missing]
            self.s1[rows], self.s2[rows] = s1.to("cpu", self.dtype), s2.to("cpu", self.dtype)
            self.filled[rows] = True
            self.encoded += len(rows)
        return self.s1[where].to(x.device, torch.long), self.s2[where].to(x.device, torch.long)
