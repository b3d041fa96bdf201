"""The toy-size random-weight Wan (farm/models/benchwan.py) with its Q8_0/Q4_0 GGUF files, built
once per test process and removed when it exits: every linear layer's width is a multiple of 32,
so Q4_0 quantises them all."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path


@functools.cache
def toy_wan_dir() -> Path:
    from farm.models.benchwan import build_bench_wan

    root = Path(tempfile.mkdtemp(prefix="farm-toy-wan-"))
    atexit.register(shutil.rmtree, root, True)
    build_bench_wan(root / "toy-wan", "toy")
    return root / "toy-wan"
