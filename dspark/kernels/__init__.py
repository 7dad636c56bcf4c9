"""Native CPU kernels, built on first use with torch's C++ extension tooling (and prebuilt by setup).

Each kernel has a pure-PyTorch fallback: when the build fails, the CPU lacks AVX2, or
DSPARK_NATIVE_KERNELS=0, callers get None and use oneDNN / `F.linear` instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from dspark.runtime import cache_root

log = logging.getLogger(__name__)
_SOURCE_DIR = Path(__file__).parent
_STALE_LOCK_SECONDS = 600


def _build_dir(name: str) -> Path:
    """A per-torch-version build folder; a lock left by a killed build is cleared (torch would wait on it)."""
    path = cache_root() / "kernels" / f"torch-{torch.__version__}" / name
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)
    return path


SOURCES = ("bindings.cpp", "small_m_linear.cpp", "block_quant_linear.cpp", "decode_ops.cpp", "draft_ops.cpp")
HEADERS = ("simd.h", "attention.h", "ops.h")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def _headers_digest() -> str:
    """torch rebuilds when a source or a flag changes, not a header: the headers' digest goes in a flag."""
    return hashlib.sha256(b"".join((_SOURCE_DIR / h).read_bytes() for h in HEADERS)).hexdigest()[:16]


@functools.cache
def sources_digest() -> str:
    """A digest of every kernel source and header: what a step costs changes with them (cost profiles)."""
    files = sorted((*SOURCES, *HEADERS))
    return hashlib.sha256(b"".join((_SOURCE_DIR / f).read_bytes() for f in files)).hexdigest()[:16]


@functools.cache
def native_ops() -> ModuleType | None:
    """The compiled CPU kernels (`small_m_linear`, `rms_norm_rows`, `block_attention`), or None."""
    if os.environ.get("DSPARK_NATIVE_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="dspark_cpu_kernels",
            sources=[str(_SOURCE_DIR / f) for f in SOURCES],
            build_directory=str(_build_dir("cpu_kernels")),
            # -fopenmp: at::parallel_for is header code; without it the kernels run on one thread.
            extra_cflags=[*CFLAGS, f"-DDSPARK_HEADERS={_headers_digest()}"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # any toolchain problem: fall back, never fail serving
        log.warning("native CPU kernels unavailable (%s); using PyTorch/oneDNN ops", err)
        return None


def simd_level() -> str:
    """The widest SIMD path the kernels take here: "avx512", "avx2", or "none" (no native kernels). The
    paths give the same bits; what a step costs differs (cost profiles are keyed by it)."""
    ops = native_ops()
    if ops is None:
        return "none"
    return "avx512" if ops.avx512_enabled() else "avx2"


def small_m_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`op(x [M, K], w [N, K]) -> x @ w.T` tuned for small M (fp32), or None when unavailable."""
    ops = native_ops()
    return None if ops is None else ops.small_m_linear
