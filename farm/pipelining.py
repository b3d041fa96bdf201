"""A renderer's two stages: generating a clip (on the accelerator) and finishing it (encode, QC,
upload, commit) beside the next one's generation, so the accelerator never waits for the encoder
or the network. Standard library only: ``bench/gpu.py`` measures this very code without farm's
other dependencies.

Policy:
- one clip generates at a time (there is one accelerator);
- clips are finished one at a time, in the order they were generated, so results come back in
  the order the renderer started them (a clip whose generation failed gives up its turn);
- the depth is bounded by the callers: a renderer actor runs ``RENDER_PIPELINE_DEPTH`` calls at
  once, so at most one finished clip waits for the encoder while the next one generates (and a
  serial renderer, depth 1, is the same code with one call at a time);
- generating and finishing are independent of each other's timing, so a pipelined renderer writes
  exactly the bytes a serial one does;
- the generate share is the time spent generating ÷ the renderer's busy wall time (time with at
  least one clip in hand): how much of the time it has work the accelerator is kept busy.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Utilisation:
    generate_s: float  # time spent generating
    busy_s: float  # wall time with at least one clip in hand
    clips: int

    @property
    def generate_share(self) -> float:
        return self.generate_s / self.busy_s if self.busy_s > 0 else 0.0


class ClipFlow:
    """The stages of one renderer; thread-safe (see the module's policy)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._generate_lock = threading.Lock()
        self._turns = threading.Condition()
        self._tickets = 0  # handed out in generation order
        self._serving = 0  # the ticket whose clip may be finished now
        self._given_up: set[int] = set()
        self._stats = threading.Lock()
        self._active = 0
        self._active_since = 0.0
        self._busy_s = 0.0
        self._generate_s = 0.0
        self._clips = 0

    @contextmanager
    def in_hand(self) -> Iterator[None]:
        """A clip is in this renderer from entering to leaving: the busy wall time's intervals."""
        with self._stats:
            if self._active == 0:
                self._active_since = self._clock()
            self._active += 1
        try:
            yield
        finally:
            with self._stats:
                self._active -= 1
                if self._active == 0:
                    self._busy_s += self._clock() - self._active_since

    @contextmanager
    def generating(self) -> Iterator[int]:
        """Hold the accelerator; yields this clip's ticket for ``finishing``. If the body raises,
        the clip gives up its finishing turn."""
        with self._generate_lock:
            with self._turns:
                ticket = self._tickets
                self._tickets += 1
            try:
                yield ticket
            except BaseException:
                self._advance(ticket)
                raise

    def generated(self, seconds: float) -> None:
        """Count ``seconds`` of accelerator work (the pipeline call itself, not model loading)."""
        with self._stats:
            self._generate_s += seconds
            self._clips += 1

    @contextmanager
    def finishing(self, ticket: int) -> Iterator[None]:
        """Wait for ``ticket``'s turn, finish the clip, hand the turn on."""
        with self._turns:
            self._turns.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            self._advance(ticket)

    def _advance(self, ticket: int) -> None:
        with self._turns:
            self._given_up.add(ticket)
            while self._serving in self._given_up:
                self._given_up.remove(self._serving)
                self._serving += 1
            self._turns.notify_all()

    def utilisation(self) -> Utilisation:
        with self._stats:
            busy = self._busy_s + (self._clock() - self._active_since if self._active else 0.0)
            return Utilisation(self._generate_s, busy, self._clips)
