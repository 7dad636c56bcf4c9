"""Native CPU kernels, built on first use with torch's C++ extension tooling (and prebuilt by setup).

Each kernel has a pure-PyTorch fallback: when the build fails, the CPU lacks AVX2, or
DSPARK_NATIVE_KERNELS=0, callers get None and use oneDNN / `F.linear` instead.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCE_DIR = Path(__file__).parent


@functools.cache
def small_m_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`op(x [M, K], w [N, K]) -> x @ w.T` tuned for small M (fp32), or None when unavailable."""
    if os.environ.get("DSPARK_NATIVE_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="dspark_small_m_linear",
            sources=[str(_SOURCE_DIR / "small_m_linear.cpp")],
            # -fopenmp: at::parallel_for is header code; without it the kernel runs on one thread.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # any toolchain problem: fall back, never fail serving
        log.warning("native small-M linear kernel unavailable (%s); using oneDNN", err)
        return None
    return module.small_m_linear
