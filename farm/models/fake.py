"""Fake models, named as such, for scheduler benchmarks and tests: ``fake:sleep-50ms`` sleeps
50 ms per clip and ``fake:noop`` returns at once; both return tiny black frames. They measure
farm's own overhead; the real model is tested and benchmarked too."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

FAKE_SPEC = re.compile(r"^fake:(noop|sleep-(\d+)ms)$")


@dataclass
class _Output:
    frames: np.ndarray


class FakePipeline:
    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    def __call__(self, *, num_frames: int, height: int, width: int, **_ignored) -> _Output:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return _Output(np.zeros((1, num_frames, height, width, 3), dtype=np.float32))

    def set_progress_bar_config(self, **_kw) -> None:
        return None


def fake_pipeline(spec: str) -> FakePipeline:
    match = FAKE_SPEC.match(spec)
    if not match:
        raise ValueError(f"not a fake model: {spec}")
    return FakePipeline(int(match.group(2)) / 1000 if match.group(2) else 0.0)
