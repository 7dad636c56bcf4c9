"""Process-wide runtime settings, owned here and nowhere else: torch's thread count and the cache folder.

Everything that needs either (the engine builder, training, tensor-parallel ranks, draft workers, the
native kernels' build folder, cost profiles, converted models) goes through these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cache_root() -> Path:
    """Where converted models, built kernels, cost profiles and training data are cached
    (`DSPARK_CACHE`, default `~/.cache/dspark`)."""
    return Path(os.environ.get("DSPARK_CACHE", Path.home() / ".cache" / "dspark"))


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave as is); returns the count in force."""
    if num_threads is not None and num_threads != torch.get_num_threads():
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()
